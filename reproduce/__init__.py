"""`make reproduce`: every claim of the two RLO papers re-run here, with seeds or folds, paired differences
and their power, a computed verdict per row, in one report (REPRODUCTION.md, figures under reproduction/).

    python reproduce.py                                   # everything, REPRODUCTION.md + reproduction/
    python reproduce.py --quick --out runs/reproduce_quick # every section at a tiny size (about 1 min)
    python reproduce.py --sections table1 gan --jobs 2    # rerun some sections (the report keeps the others)
    python -m reproduce ...                               # the same

A section is one module of this package with TITLE, FULL and QUICK (its sizes), tasks(cfg, ctx) ->
{(key, index): (function, kwargs)} (its independent runs, which go to --jobs processes) and report(cfg,
results, ctx, command) -> report.Section (tables, figures, headline rows), and its method text, the claim and
the setup with {fields} the module fills, in methods/<key>.md; adding a section is one module, its methods
file and one line in SECTIONS. Shared code: stats.py (intervals, the paired rule, power, the validation-only
choice) and report.py (markdown, the README headline block, and what every section's tables share: the
cells of a comparison row, headline rows and figures added to a Section).
"""
from . import conditioning, convergence, digits, fashion, gan, gan_images, llm, spiral, table1

# The registry: report order; the only place a section's name is declared.
SECTIONS = {"table1": table1, "convergence": convergence, "conditioning": conditioning, "spiral": spiral,
            "digits": digits, "fashion": fashion, "gan": gan, "gan_images": gan_images, "llm": llm}
