"""LLM (AISTATS 2025): llm_pipeline.py over several seeds (CE vs RLO finetuning, PTQ at 2/3/4 bits, then
finetuning in quantized space); the section reads the pipeline's results.csv and selection.csv."""
import json
import os

from engine import atomic_copy, read_csv
from lm.shared import STORIES260K

from .common import quiet
from .report import Section, Table, comparison_cells, method
from .stats import fmt_g, interval, paired, paired_cells

TITLE = "LLM (AISTATS 2025): RLO finetuning and low-bit quantization"
# llm_pipeline.py at its defaults (SmolLM2-135M) with bf16 autocast in every training step
FULL = dict(argv=["--amp"])
# Every stage of the pipeline on llama2.c's stories260K (260K parameters, ../shared/data) at a few steps each,
# fixed learning rates: a smoke test of the section, as for the others.
QUICK = dict(argv=["--model", STORIES260K, "--quant", "ldlqRG", "e8p", "--wbits", "2", "--incoh", "on", "--seqlen",
                   "128", "--eval-seqlen", "256", "--eval-windows", "2", "--nsamples", "4", "--ft-steps", "3",
                   "--qft-steps", "4", "--lr", "1e-3", "--qft-lr", "3e-3"])


def seeds_in(path):
    return {int(r["seed"]) for r in read_csv(path)} if os.path.isfile(path) else set()


def task(out, seeds, argv, jobs):
    """Run llm_pipeline.py (`argv`, `jobs` processes) for `seeds` into `out` unless its results.csv already holds
    them all (continuing the run there with --resume: its finished sub-runs are reused); its rows."""
    results = os.path.join(out, "results.csv")
    if not set(seeds) <= seeds_in(results):
        import llm_pipeline

        resume = ["--resume"] if os.path.isfile(os.path.join(out, "args.json")) else []
        with quiet(out.rstrip("/") + "_log.txt"):  # beside the run folder
            llm_pipeline.main(["--seed", *map(str, seeds), "--out", out, "--jobs", str(jobs), *argv, *resume])
    selection = os.path.join(out, "selection.csv")
    with open(os.path.join(out, "args.json")) as f:
        model = json.load(f)["model"]
    rows = [r for r in read_csv(results) if int(r["seed"]) in seeds]  # the run may hold more seeds than asked for
    return dict(dir=out, model=os.path.splitext(os.path.basename(model.rstrip("/")))[0], rows=rows,
                selection=read_csv(selection) if os.path.isfile(selection) else [])


def tasks(cfg, ctx):
    return {("pipeline", 0): (task, dict(out=os.path.join(ctx.cache, "llm"), seeds=list(range(cfg["seeds"])),
                                         argv=cfg["argv"], jobs=ctx.jobs))}


def core_seconds(results):
    """The pipeline runs its own processes: the section's cost is the sum of its sub-runs' wall seconds (each on
    one core), the fp finetuning of a (seed, loss) counted once."""
    (run,) = results.get("pipeline", [None])
    if run is None:
        return 0.0
    wall = lambda v: float(v) if v != "" else 0.0
    fts = {(r["seed"], r["loss"]): wall(r["ft_wall"]) for r in run["rows"]}
    return (sum(fts.values()) + sum(wall(r["ptq_wall"]) + wall(r["qft_wall"]) for r in run["rows"])
            + sum(wall(r["wall"]) for r in run["selection"]))


def by_seed(rows, key):
    return {int(r["seed"]): float(r[key]) for r in rows}


def pair(rows, key):
    """Per-seed CE and RLO values of `key` on the seeds both have (in seed order)."""
    ce, rlo = (by_seed([r for r in rows if r["loss"] == loss], key) for loss in ("ce", "root"))
    seeds = sorted(set(ce) & set(rlo))
    return [ce[s] for s in seeds], [rlo[s] for s in seeds]


def report(cfg, res, ctx, command):
    sec = Section("llm", TITLE, *method("llm"), command)
    table = Table("Perplexity after quantization relative to the finetuned fp model (lower is better; mean ± 95% CI "
                  "over seeds); paired CE − RLO per seed [95% CI] (positive favours RLO), MDE and verdicts on "
                  "\"RLO's ratio is lower\"", [
        "method", "bits", "incoh", "seeds", "CE PTQ/ft", "RLO PTQ/ft", "CE − RLO [95% CI]", "MDE", "verdict (PTQ)",
        "unpaired", "CE QFT/ft", "RLO QFT/ft", "CE − RLO [95% CI]", "MDE", "verdict (QFT)", "unpaired"])
    (run,) = res.get("pipeline", [None])
    if run is None:
        table.rows.append(["**pending: not run**", *[""] * 14, "no pipeline run"])
        sec.headline.append(["AISTATS: RLO lowers low-bit damage", "2 bits", "lower PPL ratio",
                             "pending: not run", "", "", "", "pending"])
        sec.tables.append(table)
        return sec
    rows = run["rows"]
    absolute = Table("Perplexity after quantization (what a user keeps; lower is better; mean ± 95% CI over seeds); "
                     "paired CE − RLO per seed [95% CI] (positive favours RLO), MDE and verdicts on \"RLO's perplexity "
                     "is lower\"", table.columns[:4] + ["CE PTQ", "RLO PTQ", *table.columns[6:10], "CE QFT",
                                                         "RLO QFT", *table.columns[12:]])
    groups = sorted({(r["quant"], int(r["wbits"]), str(r["incoh"])) for r in rows}, key=lambda g: (g[1], g[0], g[2]))
    for quant, bits, incoh in groups:
        for target, keys, reading in ((table, ("ptq_vs_ft", "qft_vs_ft"), "lower PPL ratio to its own finetuned model"),
                                      (absolute, ("ptq", "qft"), "(what a user keeps: lower PPL)")):
            row = comparison_row(rows, quant, bits, incoh, keys, sec, run["model"], reading)
            if row is not None:
                target.rows.append(row)
    sec.tables += [finetuned_table(rows), table, absolute]
    if run["selection"]:
        sec.tables.append(selection_table(run["selection"]))
    png = os.path.join(run["dir"], "pipeline.png")
    if os.path.exists(png):  # copied beside the other figures: the run folder is not part of the repository
        copy_path = os.path.join(ctx.out, "llm_pipeline.png")
        atomic_copy(png, copy_path)
        sec.add_figure(copy_path, "llm_pipeline.py's own figure")
    return sec


def finetuned_table(rows):
    """The finetuned fp models' perplexities, RLO against CE, and the learning rates each loss chose."""
    fp = Table("Perplexity of the finetuned fp model (before quantization; lower is better), and the learning "
               "rates chosen on the validation text", ["loss", "seeds", "finetuned ppl", "CE − RLO [95% CI]", "MDE",
                                                       "verdict", "lr chosen", "QFT lr chosen (by method)"])
    ft = {loss: {int(r["seed"]): r for r in rows if r["loss"] == loss} for loss in ("ce", "root")}
    ce_ft, rlo_ft = pair([r for loss in ft for r in ft[loss].values()], "finetuned")
    p_ft = paired(rlo_ft, ce_ft, higher_is_better=False)
    for loss in ("ce", "root"):
        vals = [float(r["finetuned"]) for r in ft[loss].values()]
        lrs = lambda key, by="": ", ".join(sorted({f"{r[by] + ' ' if by else ''}{float(r[key]):g}" for r in rows
                                                   if r["loss"] == loss and r.get(key, "") != ""})) or "n/a"
        fp.rows.append(["CE" if loss == "ce" else "RLO (root k=m=5)", len(vals), fmt_g(interval(vals)),
                        *(paired_cells(p_ft, 3) if loss == "root" else ["", "", "(baseline)"]), lrs("lr"),
                        lrs("qft_lr", by="quant")])
    return fp


def selection_table(selection):
    """The pipeline's selection.csv: every learning rate tried on the tuning seed and its validation perplexity."""
    number = lambda v, spec: format(float(v), spec) if v != "" else ""
    return Table("The learning rates tried on the tuning seed and their validation perplexity (the pipeline's "
                 "selection.csv; seconds: each run's wall time, on one thread)",
                 ["stage", "loss", "method", "bits", "lr", "valid ppl", "chosen", "seconds"],
                 [[r["stage"], r["loss"], r["quant"], number(r["wbits"], ".0f"), number(r["lr"], "g"),
                   number(r["valid_ppl"], ".4g"), "yes" if r["chosen"] == "True" else "", number(r["wall"], ".0f")]
                  for r in selection])


def comparison_row(rows, quant, bits, incoh, keys, sec, model, reading):
    """The PTQ and QFT values (`keys`: ratios or perplexities) of one method, RLO against CE (2 bits: also in the
    headline, after QFT); None unless both stages have paired seeds."""
    sel = [r for r in rows if (r["quant"], int(r["wbits"]), str(r["incoh"])) == (quant, bits, incoh)]
    cells, results = [], []
    for key in keys:
        ce, rlo = pair(sel, key)
        if not ce:
            break
        p = paired(rlo, ce, higher_is_better=False)
        results.append((p, ce, rlo))
        ce_ci, rlo_ci = interval(ce), interval(rlo)
        cells += [fmt_g(ce_ci), fmt_g(rlo_ci), *comparison_cells(p, rlo_ci, ce_ci, False, 3)]
    if len(results) < 2:
        return None
    if bits == 2:
        p, ce, rlo = results[1]
        sec.add_headline("AISTATS: RLO lowers low-bit damage", f"{model}, {quant} 2 bits, incoh {incoh}, after QFT",
                         reading, f"{fmt_g(interval(ce))} vs {fmt_g(interval(rlo))}", p, 3)
    return [quant, bits, incoh, len(results[0][1]), *cells]
