"""reproduce.py: the verdict rule and the intervals it reads, and `make reproduce-quick` end to end (every
section, table and figure of the report is produced)."""
import math
import os
import re
import shlex
import subprocess
import sys

import pytest

import reproduce
from engine import UserError, mean_ci

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INF = math.inf


@pytest.mark.parametrize("a,b,higher,expected", [
    ((5, 6, 7), (1, 2, 3), True, "reproduced"),            # disjoint, A above
    ((1, 2, 3), (5, 6, 7), True, "not reproduced"),        # disjoint, A below: the opposite effect
    ((2, 4, 6), (1, 3, 5), True, "inconclusive"),          # overlap
    ((3, 4, 5), (1, 2, 3), True, "inconclusive"),          # touching counts as overlap
    ((1, 2, 3), (5, 6, 7), False, "reproduced"),           # lower is better: A below wins
    ((5, 6, 7), (1, 2, 3), False, "not reproduced"),
    ((5, 6, math.nan), (1, 2, 3), True, "inconclusive"),   # one run: no interval
    ((9, 10, 11), (50, INF, INF), False, "reproduced"),    # B never reached the level on some runs, lower bound 50
    ((50, INF, INF), (9, 10, 11), False, "not reproduced"),
    ((40, INF, INF), (30, INF, INF), False, "inconclusive"),
])
def test_verdict(a, b, higher, expected):
    assert reproduce.verdict(a, b, higher) == expected


def test_intervals():
    values = [81.0, 84.5, 79.0, 88.0, 83.0]
    lo, mean, hi = reproduce.interval(values)
    assert (mean, (hi - lo) / 2) == pytest.approx(mean_ci(values))
    lo, mean, hi = reproduce.interval([80.0], n=100)  # binomial: 1.96 sqrt(0.8 * 0.2 / 100) = 7.84 points
    assert (lo, mean, hi) == pytest.approx((80 - 7.84, 80, 80 + 7.84))
    ci, text = reproduce.reach([10, 12, 11, 13, 9], budget=100)
    assert ci == pytest.approx(reproduce.interval([10, 12, 11, 13, 9])) and "±" in text
    ci, text = reproduce.reach([10, INF, 20, INF, 30], budget=100)
    assert ci == (reproduce.interval([10, 100, 20, 100, 30])[0], INF, INF) and text == "≥ 52.0 (2/5 never within 100)"
    assert reproduce.first_at([0.9, 0.5, 0.2], lambda g: g <= 0.5) == 1.0
    assert reproduce.first_at([0.9, 0.8], lambda g: g <= 0.5) == INF


def test_bad_arguments():
    with pytest.raises(UserError, match="unknown section 'tabel1'"):
        reproduce.parse_args(["--sections", "tabel1"])
    with pytest.raises(UserError, match="--n-seeds must be >= 2"):
        reproduce.parse_args(["--n-seeds", "1"])
    with pytest.raises(UserError, match="--jobs must be >= 1"):
        reproduce.parse_args(["--jobs", "0"])


def test_readme_quotes_the_reports_headline():
    """README.md quotes REPRODUCTION.md's headline table verbatim (`make reproduce` rewrites both)."""
    blocks = []
    for name in ("README.md", "REPRODUCTION.md"):
        path = os.path.join(ROOT, name)
        if not os.path.exists(path):
            pytest.skip("no REPRODUCTION.md yet (run make reproduce)")
        with open(path) as f:
            text = f.read()
        blocks.append(text.split(reproduce.HEADLINE_START, 1)[1].split(reproduce.HEADLINE_END, 1)[0])
    assert blocks[0] == blocks[1]


def quick_command():
    """The arguments of the Makefile's reproduce-quick recipe."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        recipe = f.read().split("\nreproduce-quick:", 1)[1].split("\n")[1]
    words = shlex.split(recipe)
    assert words[0] == "$(PY)" and words[1] == "reproduce.py" and "--quick" in words
    return words[1:]


def test_make_reproduce_quick_writes_every_section_table_and_figure(tmp_path):
    if not os.path.isdir(reproduce.SHARED_UCI):
        pytest.skip(f"{reproduce.SHARED_UCI} absent: Table 1 and its figures need the shared UCI files")
    out = tmp_path / "quick"
    # --llm-dir: a folder without a pipeline run, so the LLM row is "pending" whatever runs/ holds here
    quick = [sys.executable, *quick_command(), "--out", str(out), "--llm-dir", str(tmp_path / "no_llm")]
    proc = subprocess.run(quick, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "REPRODUCTION.md").read_text()
    titles = re.findall(r"^## \d+\. (.+)$", report, flags=re.M)
    assert len(titles) == len(reproduce.SECTIONS) == 7
    body = report.split("## Headline", 1)[1]
    headline = body.split(reproduce.HEADLINE_START, 1)[1].split(reproduce.HEADLINE_END, 1)[0]
    verdicts = [row.split("|")[-2].strip() for row in headline.strip().splitlines()[2:]]
    assert len(verdicts) >= 15
    allowed = {"reproduced", "not reproduced", "inconclusive", "pending"}
    assert all(set(v.split(" / ")) <= allowed for v in verdicts), verdicts
    sections = body.split("\n## ")[1:]
    expected_tables = {"Table 1": 2, "Figure 1": 1, "Lemma 2": 1, "Figure 2": 1, "Deep nets": 2, "GAN": 1, "LLM": 1}
    expected_figures = {"Table 1": 1, "Figure 1": 1, "Lemma 2": 0, "Figure 2": 3, "Deep nets": 1, "GAN": 1, "LLM": 0}
    for text, (name, n_tables) in zip(sections, expected_tables.items()):
        assert name in text.splitlines()[0]
        assert "**Command:** `python reproduce.py " in text and ("--quick --sections" in text or name == "LLM")
        tables = re.findall(r"^\*.+\*\n\n\| .+ \|\n\|(?:---\|)+\n((?:\| .* \|\n)+)", text, flags=re.M)
        assert len(tables) == n_tables, (name, len(tables))
        figures = re.findall(r"^!\[.+\]\((.+\.png)\)", text, flags=re.M)
        assert len(figures) == expected_figures[name], (name, figures)
        for fig in figures:
            with open(out / fig, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Rows hold computed numbers: Table 1 has one row per UCI set, each with a mean ± CI.
    table1 = sections[0].split("| data set |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert [row.split("|")[1].strip() for row in table1] == list(reproduce.UCI)
    assert all(re.search(r"\d+\.\d\d ± \d+\.\d\d", row) for row in table1)
    assert "pending: not run" in sections[-1]
    # The train.py runs kept their metrics but not their checkpoints; each section's raw results are cached,
    # and a rerun of one section rewrites the report with all of them.
    runs = out / "cache" / "runs" / "digits"
    assert os.listdir(runs)
    for run in os.listdir(runs):
        files = set(os.listdir(runs / run))
        assert "metrics.csv" in files and not files & {"last.pt", "best.pt"}
    assert sorted(os.listdir(out / "cache")) == sorted([f"{s}.pt" for s in reproduce.SECTIONS if s != "llm"] + ["runs"])
    proc = subprocess.run([*quick, "--sections", "spiral", "--jobs", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = (out / "REPRODUCTION.md").read_text()
    assert re.findall(r"^## \d+\. (.+)$", again, flags=re.M) == titles
    assert again.split("## 2.")[0].split("## Verdict rule")[1] == report.split("## 2.")[0].split("## Verdict rule")[1]


def test_update_readme_replaces_only_the_quoted_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{reproduce.HEADLINE_START}\nold\n{reproduce.HEADLINE_END}\noutro\n")
    sec = reproduce.Section("x", "t", "c", "s", "cmd", headline=[["a", "b", "c", "d", "reproduced"]])
    reproduce.update_readme(str(readme), [sec])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "| a | b | c | d | reproduced |" in text
    assert "old" not in text
    readme.write_text("no markers")
    with pytest.raises(UserError, match="no <!-- reproduce:headline:start -->"):
        reproduce.update_readme(str(readme), [sec])


def test_llm_row_is_pending_without_a_run_and_computed_with_one(tmp_path):
    pending = reproduce.report_llm({}, str(tmp_path / "absent"), str(tmp_path / "out"), "cmd")
    assert pending.headline[0][-1] == "pending" and "pending: not run" in pending.tables[0].rows[0][0]
    fields = ["seed", "loss", "quant", "wbits", "incoh", "ptq_vs_ft", "qft_vs_ft"]
    rows = [[seed, loss, "ldlqRG", 2, "off", ptq, qft] for seed in range(3)
            for loss, ptq, qft in (("ce", 10 + seed, 2.4 + 0.01 * seed), ("root", 20 + seed, 2.2 + 0.01 * seed))]
    (tmp_path / "results.csv").write_text("\n".join(",".join(map(str, r)) for r in [fields] + rows) + "\n")
    (tmp_path / "pipeline.png").write_bytes(b"\x89PNG\r\n\x1a\nfigure")
    sec = reproduce.report_llm({}, str(tmp_path), str(tmp_path / "out"), "cmd")
    # the figure is copied beside the report's others: the run folder is not part of the repository
    assert [f[0] for f in sec.figures] == [str(tmp_path / "out" / "llm_pipeline.png")]
    assert (tmp_path / "out" / "llm_pipeline.png").read_bytes() == (tmp_path / "pipeline.png").read_bytes()
    (row,) = sec.tables[0].rows
    assert row[:4] == ["ldlqRG", 2, "off", 3]
    assert row[6] == "not reproduced" and row[9] == "reproduced"  # RLO: worse after PTQ, better after QFT
    assert sec.headline[0][-1] == "reproduced"
