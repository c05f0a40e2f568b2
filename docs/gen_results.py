"""Render benchmarks/results/*.csv as markdown tables (the benchmarks page's "Results files" section).

    python docs/gen_results.py            # print the markdown
The mkdocs hook (`docs/hooks.py`) puts the same text where the benchmarks page says
`<!-- results-tables -->`, so `make docs` always shows the files as they are."""
import argparse
import csv
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CONTEXT = ("machine", "threads", "date", "commit")


def cell(value):
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(path):
    """One file: its name, the machine/threads/date/commit it was measured with, then its own columns."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    name = os.path.splitext(os.path.basename(path))[0]
    out = [f"### `{name}`", ""]
    if not rows:
        return out + ["(no rows)", ""]
    columns = [c for c in rows[0] if c not in CONTEXT]
    runs = sorted({tuple(r.get(c, "") for c in CONTEXT) for r in rows})
    for machine, threads, date, commit in runs:
        out.append(f"- {machine}, {threads} thread(s), {date}, commit `{commit}`")
    # with several runs each row says which machine (when they differ) and thread count it comes from
    extra = (["machine"] if len({run[0] for run in runs}) > 1 else []) + (["threads"] if len(runs) > 1 else [])
    out += ["", "| " + " | ".join(columns + extra) + " |", "|" + "---|" * (len(columns) + len(extra))]
    for r in rows:
        out.append("| " + " | ".join(cell(r.get(c, "")) for c in columns + extra) + " |")
    return out + [""]


def render_one(name, directory=RESULTS):
    """The table of `directory/name.csv` without its heading, or a line saying how to make the file."""
    path = os.path.join(directory, f"{name}.csv")
    if not os.path.isfile(path):
        return f"No `{name}` results yet: run `benchmarks/{name}.py` and rebuild the documentation.\n"
    return "\n".join(table(path)[2:])


def render(directory=RESULTS):
    paths = sorted(glob.glob(os.path.join(directory, "*.csv")))
    if not paths:
        return ("No results file yet: run a benchmark (`make bench`, or one `benchmarks/bench_*.py`) and "
                "rebuild the documentation.\n")
    lines = []
    for path in paths:
        lines += table(path)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Print benchmarks/results/*.csv as markdown tables.")
    p.add_argument("directory", nargs="?", default=RESULTS, help="folder of results CSVs (default: %(default)s)")
    sys.stdout.write(render(p.parse_args(argv).directory))


if __name__ == "__main__":
    main()
