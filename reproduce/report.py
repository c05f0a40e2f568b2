"""The report's structure (Section, Table) and its markdown: REPRODUCTION.md and the README's headline block."""
import os
import re
from dataclasses import dataclass, field

from engine import UserError, atomic_write_text

from .stats import RULE, fmt_mde, fmt_paired, paired_cells, verdict

HEADLINE_START, HEADLINE_END = "<!-- reproduce:headline:start -->", "<!-- reproduce:headline:end -->"
HEADLINE_COLUMNS = ["claim", "setting", "paper", "ours (baseline vs RLO)", "n",
                    "paired difference, > 0 favours RLO [95% CI]", "MDE (80% power)", "verdict"]


@dataclass
class Table:
    caption: str
    columns: list
    rows: list = field(default_factory=list)


@dataclass
class Section:
    key: str
    title: str
    claim: str
    setup: str
    command: str
    tables: list = field(default_factory=list)
    figures: list = field(default_factory=list)  # (path, caption, command)
    notes: list = field(default_factory=list)
    headline: list = field(default_factory=list)  # rows of HEADLINE_COLUMNS, the verdict last

    def add_headline(self, claim, setting, paper, ours, p, digits=2):
        """A headline row from a paired result `p` (reproduce.stats.paired or mcnemar)."""
        mde = fmt_mde(p, digits)
        if p["verdict"] == "inconclusive" and mde != "n/a":
            mde = f"no effect larger than {mde}"
        self.headline.append([claim, setting, paper, ours, p["n"], fmt_paired(p, digits), mde, p["verdict"]])

    def add_figure(self, path, caption):
        """A figure made by the section's own command."""
        self.figures.append((path, caption, self.command))


METHODS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "methods")


def _paragraphs(key):
    """{"Claim": text, "Setup": text} of methods/<key>.md, each paragraph's lines joined into one."""
    with open(os.path.join(METHODS, f"{key}.md"), encoding="utf-8") as f:
        parts = dict(re.findall(r"^## (Claim|Setup)\n(.*?)(?=^## |\Z)", f.read(), flags=re.M | re.S))
    return {name: " ".join(text.split("\n")).strip() for name, text in parts.items()}


def method(key, **fields):
    """(claim, setup) of section `key`: the paragraphs under "## Claim" and "## Setup" of methods/<key>.md, its
    {fields} filled (str.format)."""
    parts = _paragraphs(key)
    return parts["Claim"].format(**fields), parts["Setup"].format(**fields)


def claim(key):
    """The claim of section `key` (methods/<key>.md)."""
    return _paragraphs(key)["Claim"].format()


def comparison_cells(p, ours, base, higher_is_better=True, digits=2):
    """The cells every comparison row ends with: the paired difference [95% CI], its MDE and verdict (`p`,
    reproduce.stats.paired or mcnemar), then the unpaired verdict of the two intervals `ours` vs `base`."""
    return [*paired_cells(p, digits), verdict(ours, base, higher_is_better)]


def headline_table(sections):
    rows = [r for sec in sections for r in sec.headline]
    return ["| " + " | ".join(HEADLINE_COLUMNS) + " |", "|" + "---|" * len(HEADLINE_COLUMNS)] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def headline_block(sections, provenance):
    """The headline table and each section's run time: what README.md quotes between the markers."""
    times = ", ".join(f"{name} {sec / 60:.1f}" for name, date, sec, cmd in provenance if date != "not run")
    pending = [name for name, date, sec, cmd in provenance if date == "not run"]
    return headline_table(sections) + ["", f"Core-minutes of each section's runs (one torch thread per run): {times}"
                                       + (f"; not run yet: {', '.join(pending)}." if pending else ".")]


def markdown(sections, provenance, args, wall):
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(args.report)))
    mode = "QUICK (tiny sizes: a smoke test, not evidence)" if args.quick else "full-size"
    lines = ["# Reproduction report: Rooted Logistic Objectives (arXiv 2310.03890) and the AISTATS-2025 follow-up", "",
             f"Written by `{args.command}` ({wall / 60:.1f} min wall, {args.jobs} parallel processes) from the "
             f"{mode} runs of each section below; every number is computed by the `reproduce` package from those "
             f"runs, nothing is typed in by hand except the papers' numbers.", "",
             "| section | run on | core-minutes of runs (summed over processes) | by |", "|---|---|---|---|"]
    lines += [f"| {s} | {date} | {sec / 60:.1f} | `{cmd}` |" for s, date, sec, cmd in provenance]
    lines += ["", "## Verdict rule", "", RULE, "", "## Headline", "", HEADLINE_START,
              *headline_block(sections, provenance), HEADLINE_END, ""]
    for i, sec in enumerate(sections, 1):
        lines += [f"## {i}. {sec.title}", "", f"**Claim.** {sec.claim}", "", f"**Setup.** {sec.setup}", "",
                  f"**Command:** `{sec.command}`", ""]
        for table in sec.tables:
            lines += [f"*{table.caption}*", "", "| " + " | ".join(table.columns) + " |",
                      "|" + "---|" * len(table.columns)]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table.rows]
            lines.append("")
        for note in sec.notes:
            lines += [note, ""]
        for path, caption, command in sec.figures:
            lines += [f"![{caption}]({rel(path)})", "", f"*{caption}.* Made by `{command}`.", ""]
    return "\n".join(lines)


def update_readme(readme, sections, provenance):
    """Replace the README's quoted headline block (between the markers) by this run's."""
    with open(readme) as f:
        text = f.read()
    if HEADLINE_START not in text or HEADLINE_END not in text:
        raise UserError(f"{readme} has no {HEADLINE_START} ... {HEADLINE_END} block to update")
    head, rest = text.split(HEADLINE_START, 1)
    _, tail = rest.split(HEADLINE_END, 1)
    block = [HEADLINE_START, *headline_block(sections, provenance), HEADLINE_END]
    atomic_write_text(readme, head + "\n".join(block) + tail)
