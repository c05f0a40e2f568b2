"""The reproduce package: the paired rule, its power (MDE, seeds needed), the censored and one-split rules
against hand / scipy computations, the validation-only choice of learning rates, the LLM section on a
pipeline's results.csv, and `make reproduce-quick` end to end (every section, table and figure)."""
import math
import json
import os
import re
import shlex
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats as sps

import reproduce
from engine import UserError, atomic_save, mean_ci, read_csv
from lm.shared import STORIES260K
from reproduce import cli, digits, gan, llm, report, spiral
from reproduce.common import SHARED_UCI, UCI, first_at
from reproduce.stats import (choose, interval, mcnemar, mde, paired, paired_cells, power, reach, seeds_needed,
                             verdict)
from tests.helpers import ROOT

INF = math.inf


@pytest.mark.parametrize("a,b,higher,expected", [
    ((5, 6, 7), (1, 2, 3), True, "reproduced"),            # disjoint, A above
    ((1, 2, 3), (5, 6, 7), True, "not reproduced"),        # disjoint, A below: the opposite effect
    ((2, 4, 6), (1, 3, 5), True, "inconclusive"),          # overlap
    ((3, 4, 5), (1, 2, 3), True, "inconclusive"),          # touching counts as overlap
    ((1, 2, 3), (5, 6, 7), False, "reproduced"),           # lower is better: A below wins
    ((5, 6, math.nan), (1, 2, 3), True, "inconclusive"),   # one run: no interval
    ((9, 10, 11), (50, INF, INF), False, "reproduced"),    # B never reached the level on some runs, lower bound 50
    ((40, INF, INF), (30, INF, INF), False, "inconclusive"),
])
def test_unpaired_verdict(a, b, higher, expected):
    assert verdict(a, b, higher) == expected


def test_intervals():
    values = [81.0, 84.5, 79.0, 88.0, 83.0]
    lo, mean, hi = interval(values)
    assert (mean, (hi - lo) / 2) == pytest.approx(mean_ci(values))
    lo, mean, hi = interval([80.0], n=100)  # binomial: 1.96 sqrt(0.8 * 0.2 / 100) = 7.84 points
    assert (lo, mean, hi) == pytest.approx((80 - 7.84, 80, 80 + 7.84))
    ci, text = reach([10, INF, 20, INF, 30], budget=100)
    assert ci == (interval([10, 100, 20, 100, 30])[0], INF, INF) and text == "≥ 52.0 (2/5 never within 100)"
    assert first_at([0.9, 0.5, 0.2], lambda g: g <= 0.5) == 1.0 and first_at([0.9, 0.8], lambda g: g <= 0.5) == INF


def test_paired_rule_matches_scipy_and_gains_over_unpaired():
    # RLO beats LR by 0.5-1.5 points on every fold, but the folds differ by 10 points among themselves.
    lr = np.array([70.0, 80.0, 75.0, 85.0, 90.0])
    rlo = lr + np.array([1.0, 0.5, 1.5, 1.0, 0.8])
    p = paired(rlo, lr)
    d = rlo - lr
    lo, hi = sps.t.interval(0.95, 4, loc=d.mean(), scale=sps.sem(d))
    assert (p["diff"], p["lo"], p["hi"], p["n"]) == pytest.approx((d.mean(), lo, hi, 5))
    assert sps.ttest_rel(rlo, lr).pvalue < 0.05 and p["verdict"] == "reproduced"
    assert verdict(interval(rlo), interval(lr)) == "inconclusive"  # the unpaired intervals overlap
    assert paired(lr, rlo)["verdict"] == "not reproduced"
    assert paired(rlo, lr, higher_is_better=False)["verdict"] == "not reproduced"  # e.g. perplexities
    noisy = paired(lr + np.array([2.0, -1.0, 0.5, -0.5, 1.0]), lr)  # covers 0
    assert noisy["lo"] < 0 < noisy["hi"] and noisy["verdict"] == "inconclusive"
    assert paired([1.0], [0.0])["verdict"] == "inconclusive"


def test_power_mde_and_seeds_needed_by_hand():
    # Hand case (G*Power, one-sample t, two-sided 5%): d/sd = 1 needs n = 10 for 80% power (power 0.803)
    assert power(1.0, 1.0, 10) == pytest.approx(0.8031, abs=1e-3) and power(1.0, 1.0, 9) < 0.8
    assert seeds_needed(1.0, 1.0) == 10 and seeds_needed(-2.0, 2.0) == 10 and seeds_needed(0.5, 1.0) == 34
    # The MDE is where the exact power (scipy's noncentral t, written out here) reaches 80%.
    for n, sd in ((5, 1.3), (10, 0.4), (2, 1.0)):
        e = mde(sd, n)
        crit, nc = sps.t.ppf(0.975, n - 1), e * math.sqrt(n) / sd
        exact = sps.nct.sf(crit, n - 1, nc) + np.nan_to_num(sps.nct.cdf(-crit, n - 1, nc))
        assert exact == pytest.approx(0.8, abs=1e-6)
        assert e > (1.959964 + 0.841621) * sd / math.sqrt(n)  # above the normal approximation (t has fatter tails)
    assert mde(1.0, 10) == pytest.approx(0.9958, abs=1e-3)  # G*Power: dz = 0.9958 at n = 10
    assert paired([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])["mde"] == pytest.approx(mde(1.0, 3))


def test_censored_rule():
    # RLO faster on every fold but censored once: the differences over-state it, so no "reproduced".
    p = paired([10, 12, INF, 11, 9], [250, 260, 290, 255, 249], higher_is_better=False, budget=300)
    assert p["lo"] > 0 and p["verdict"] == "inconclusive"
    # A censored baseline only under-states RLO's advantage: "reproduced" stands.
    p = paired([10, 12, 14, 11, 9], [80, 90, INF, 85, 95], higher_is_better=False, budget=100)
    assert p["diff"] == pytest.approx(np.mean([70, 78, 86, 74, 86])) and p["verdict"] == "reproduced"
    # ... and cannot support "not reproduced".
    p = paired([50, 52, 54, 51, 55], [10, 12, INF, 11, 9], higher_is_better=False, budget=60)
    assert p["hi"] < 0 and p["verdict"] == "inconclusive"
    # Every run censored on both sides: d = 0 with no spread, which must not read "no effect larger than 0".
    p = paired([INF] * 5, [INF] * 5, higher_is_better=False, budget=8)
    assert p["verdict"] == "inconclusive" and math.isnan(p["mde"])
    assert paired_cells(p)[1:] == ["n/a", "inconclusive"]
    assert not math.isnan(paired([10, 12, 14, 11, 9], [80, 90, 70, 85, 95], higher_is_better=False)["mde"])
    # Identical results on every fold: no spread, so no MDE ("no effect larger than 0" would claim too much).
    p = paired([96.6] * 5, [96.6] * 5)
    assert p["verdict"] == "inconclusive" and math.isnan(p["mde"])


def test_mcnemar_one_split_by_hand():
    # 100 shared test rows: 10 only RLO gets right, 2 only LR: exact binomial p = P(X >= 10 or <= 2 | 12, 1/2)
    a = np.array([True] * 10 + [False] * 2 + [True] * 60 + [False] * 28)
    b = np.array([False] * 10 + [True] * 2 + [True] * 60 + [False] * 28)
    m = mcnemar(a, b)
    hand = 2 * sum(math.comb(12, j) for j in range(10, 13)) / 2 ** 12
    assert (m["b"], m["c"], m["diff"], m["p"]) == pytest.approx((10, 2, 8.0, hand)) and hand < 0.05
    assert m["verdict"] == "reproduced" and mcnemar(b, a)["verdict"] == "not reproduced"
    ci = sps.binomtest(10, 12).proportion_ci(method="exact")
    assert (m["lo"], m["hi"]) == pytest.approx(((2 * ci.low - 1) * 12, (2 * ci.high - 1) * 12))
    assert m["mde"] == 8.0  # 10 vs 2 is the smallest significant split of 12 discordant rows (9 vs 3: p 0.146)
    assert mcnemar(a[10:], b[10:])["verdict"] == "inconclusive"  # no discordant rows


def test_choose_reads_validation_scores_only():
    grid = [1e-3, 2e-3, 5e-4]
    assert choose(grid, {1e-3: 90.0, 2e-3: 95.0, 5e-4: 95.0}) == 2e-3  # ties: the first listed
    assert choose(grid, {1e-3: 0.3, 2e-3: 0.1, 5e-4: 0.2}, higher_is_better=False) == 2e-3
    with pytest.raises(ValueError, match="no validation score"):
        choose(grid, {1e-3: 1.0})


CTX = lambda tmp_path: SimpleNamespace(out=str(tmp_path), cache=str(tmp_path), data_dir=SHARED_UCI, cifar_note="",
                                       jobs=2)


def test_sections_choose_on_validation_never_on_test(tmp_path):
    """In every tuned section, validation favours one learning rate and test another: the report must
    pick (and print) the validation one, and report that rate's test numbers."""
    seeds = range(3)
    # digits: lr 5e-4 best on validation, 2e-3 best on test
    dcfg = dict(digits.QUICK, seeds=3)
    curve = lambda val, test: dict(val_acc=[val], test_acc=[test], seconds=1.0)
    accs = {5e-4: (99.0, 80.0), 1e-3: (90.0, 85.0), 2e-3: (50.0, 99.0)}
    dcfg["lr_grid"] = tuple(accs)
    res = {(net, loss, k, m, lr): [curve(v - 0.1 * s, t + 0.1 * s) for s in seeds]
           for net, _ in dcfg["nets"] for loss, k, m in digits.LOSSES for lr, (v, t) in accs.items()}
    sec = digits.report(dcfg, res, CTX(tmp_path), "cmd")
    rows = sec.tables[0].rows
    assert len(rows) == 6 and all(r[2] == "0.0005" for r in rows) and all(r[4].startswith("80.10") for r in rows)
    # spiral: lr 0.02 best on validation, 0.005 on test
    scfg = dict(spiral.QUICK, seeds=3)
    res = {model: [{(m, lr): dict(val=v, acc=t, curve=[t]) for m, _ in spiral.METHODS
                    for lr, (v, t) in {0.005: (60.0, 99.0), 0.01: (70.0, 90.0), 0.02: (80.0, 70.0)}.items()}
                   for _ in seeds] for model, _ in scfg["spiral"]}
    sec = spiral.report(scfg, res, CTX(tmp_path), "cmd")
    assert all(r[2] == "0.02 / 0.02" and r[3].startswith("70.00") for r in sec.tables[0].rows)
    # gan: validation W1 lowest at lr 1e-3, test W1 lowest at 2e-3
    gcfg = dict(gan.QUICK, seeds=3, lr_grid=(1e-3, 2e-3))
    hist = dict(step=[1], modes=[1], d_real=[1.0], d_fake=[0.0], g_grad=[1.0])
    run = lambda vw, w: dict(val_w1=vw, w1=w, w1_real=0.01, modes=3, n_modes=8, hq=0.5, history=hist,
                             samples=np.zeros((4, 2)))
    res = {(data, loss, lr): [run(*({1e-3: (0.1, 0.9), 2e-3: (0.5, 0.2)}[lr])) for _ in seeds]
           for data in ("ring", "grid") for loss in gan.LOSSES for lr in gcfg["lr_grid"]}
    sec = gan.report(gcfg, res, CTX(tmp_path), "cmd")
    assert [r[-1] for r in sec.tables[1].rows] == ["0.001"] * 4
    assert all(r[3] == "0.900 ± 0.000" for r in sec.tables[0].rows if r[1] == "W1 to real samples")


def test_llm_section_reads_the_pipelines_results(tmp_path):
    cfg = dict(llm.FULL, seeds=3)
    pending = llm.report(dict(llm.QUICK, seeds=2), {}, CTX(tmp_path), "cmd")
    assert pending.headline[0][-1] == "pending" and "pending: not run" in pending.tables[0].rows[0][0]
    out = tmp_path / "llm"
    out.mkdir()
    fields = ["seed", "loss", "quant", "wbits", "incoh", "finetuned", "ptq", "qft", "ptq_vs_ft", "qft_vs_ft", "lr",
              "qft_lr", "ft_wall", "ptq_wall", "qft_wall"]
    # ratios: RLO worse after PTQ, better after QFT; perplexities: RLO worse after both
    rows = [[seed, loss, quant, 2, "on", ft + 0.1 * seed, (ft + 0.1 * seed) * (ptq + seed),
             (ft + 0.1 * seed) * (qft + 0.01 * seed), ptq + seed, qft + 0.01 * seed, 1e-3, 3e-4, 60, 30, 20]
            for seed in range(4) for quant in ("ldlqRG", "e8p")
            for loss, ft, ptq, qft in (("ce", 10.0, 10, 2.4), ("root", 11.5, 20, 2.2))]
    (out / "results.csv").write_text("\n".join(",".join(map(str, r)) for r in [fields] + rows) + "\n")
    (out / "selection.csv").write_text("stage,loss,quant,wbits,incoh,lr,valid_ppl,chosen,wall\n"
                                       "ft,ce,,,,0.001,12.0,True,100\nft,root,,,,0.001,12.5,True,100\n")
    (out / "args.json").write_text(json.dumps(dict(model="/data/SmolLM2-135M-Instruct.Q4_1.gguf")))
    (out / "pipeline.png").write_bytes(b"\x89PNG\r\n\x1a\nfigure")
    # the results hold the requested seeds (and one more, left out): reused, no pipeline run (which would fail on
    # this folder)
    ((key, (fn, kwargs)),) = llm.tasks(cfg, CTX(tmp_path)).items()
    assert kwargs == dict(out=str(out), seeds=[0, 1, 2], argv=["--amp"], jobs=2)
    result = fn(**kwargs)
    # each (seed, loss)'s fp finetuning once, every PTQ and QFT, the selection runs
    assert llm.core_seconds({"pipeline": [result]}) == 3 * 2 * 60 + 12 * (30 + 20) + 200
    sec = llm.report(cfg, {"pipeline": [result]}, CTX(tmp_path / "fig"), "cmd")
    assert (tmp_path / "fig" / "llm_pipeline.png").read_bytes() == (out / "pipeline.png").read_bytes()
    fp, table, absolute, selection = sec.tables
    assert fp.rows[1][3].startswith("-1.500 [-1.500") and fp.rows[1][5] == "not reproduced"  # RLO's fp ppl higher
    assert fp.rows[0][6] == "0.001" and fp.rows[0][7] == "e8p 0.0003, ldlqRG 0.0003"
    assert [r[:4] for r in table.rows] == [["e8p", 2, "on", 3], ["ldlqRG", 2, "on", 3]]
    assert table.rows[0][8] == "not reproduced" and table.rows[0][14] == "reproduced"  # worse PTQ, better QFT
    assert [r[:4] for r in absolute.rows] == [r[:4] for r in table.rows]
    assert absolute.rows[0][8] == absolute.rows[0][14] == "not reproduced"
    assert [h[-1] for h in sec.headline] == ["reproduced", "not reproduced"] * 2 and sec.headline[0][4] == 3
    assert sec.headline[0][1] == "SmolLM2-135M-Instruct.Q4_1, e8p 2 bits, incoh on, after QFT"
    assert selection.rows == [["ft", "ce", "", "", "0.001", "12", "yes", "100"],
                              ["ft", "root", "", "", "0.001", "12.5", "yes", "100"]]


def test_bad_arguments():
    with pytest.raises(UserError, match="unknown section 'tabel1'"):
        cli.parse_args(["--sections", "tabel1"])
    with pytest.raises(UserError, match="--n-seeds must be >= 2"):
        cli.parse_args(["--n-seeds", "1"])
    with pytest.raises(UserError, match="--jobs must be >= 1"):
        cli.parse_args(["--jobs", "0"])


def test_readme_quotes_the_reports_headline():
    """README.md quotes REPRODUCTION.md's headline table verbatim (`make reproduce` rewrites both)."""
    blocks = []
    for name in ("README.md", "REPRODUCTION.md"):
        path = os.path.join(ROOT, name)
        if not os.path.exists(path):
            pytest.skip("no REPRODUCTION.md yet (run make reproduce)")
        with open(path) as f:
            text = f.read()
        blocks.append(text.split(report.HEADLINE_START, 1)[1].split(report.HEADLINE_END, 1)[0])
    assert blocks[0] == blocks[1]


def test_update_readme_replaces_only_the_quoted_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.HEADLINE_START}\nold\n{report.HEADLINE_END}\noutro\n")
    sec = report.Section("x", "t", "c", "s", "cmd", headline=[["a", "b", "c", "d", 5, "+1", "2", "reproduced"]])
    provenance = [("x", "2026-01-02", 90.0, "cmd"), ("y", "not run", 0.0, "cmd y")]
    report.update_readme(str(readme), [sec], provenance)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n")
    assert "| a | b | c | d | 5 | +1 | 2 | reproduced |" in text
    assert "runs (one torch thread per run): x 1.5; not run yet: y." in text
    assert "old" not in text
    readme.write_text("no markers")
    with pytest.raises(UserError, match="no <!-- reproduce:headline:start -->"):
        report.update_readme(str(readme), [sec], provenance)


def quick_command():
    """The arguments of the Makefile's reproduce-quick recipe."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        recipe = f.read().split("\nreproduce-quick:", 1)[1].split("\n")[1]
    words = shlex.split(recipe)
    assert words[0] == "$(PY)" and words[1] == "reproduce.py" and "--quick" in words
    return words[1:]


@pytest.mark.slow
@pytest.mark.real_data
def test_make_reproduce_quick_writes_every_section_table_and_figure(tmp_path):
    if not os.path.isdir(SHARED_UCI) or not os.path.isfile(STORIES260K):
        pytest.skip(f"{SHARED_UCI} or {STORIES260K} absent: Table 1 needs the shared UCI files, the LLM section "
                    "stories260K")
    out = tmp_path / "quick"
    # one process: the suite already runs one test per core
    quick = [sys.executable, *quick_command(), "--out", str(out), "--jobs", "1"]
    proc = subprocess.run(quick, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "REPRODUCTION.md").read_text()
    titles = re.findall(r"^## \d+\. (.+)$", text, flags=re.M)
    assert titles == [m.TITLE for m in reproduce.SECTIONS.values()] and len(titles) == 9
    assert "## Verdict rule" in text and "noncentral t" in text  # the rule, stated once
    body = text.split("## Headline", 1)[1]
    headline = body.split(report.HEADLINE_START, 1)[1].split(report.HEADLINE_END, 1)[0]
    table = [row for row in headline.strip().splitlines() if row.startswith("|")]
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in table[2:]]
    assert "Core-minutes of each section's runs" in headline.strip().splitlines()[-1]
    assert len(cells) >= 30 and all(len(c) == len(report.HEADLINE_COLUMNS) for c in cells)
    assert {c[-1] for c in cells} <= {"reproduced", "not reproduced", "inconclusive", "pending"}
    assert all(c[4] in ("2", "187") for c in cells if c[-1] != "pending")  # n: 2 quick seeds, SPECTF's test rows
    sections = body.split("\n## ")[1:]
    expected_tables = {"Table 1": 2, "Figure 1": 1, "Lemma 2": 1, "Figure 2": 1, "Deep nets": 3, "Fashion-MNIST": 3,
                       "GAN": 2, "GAN on Fashion-MNIST": 2, "LLM": 3}
    expected_figures = {"Table 1": 1, "Figure 1": 1, "Lemma 2": 0, "Figure 2": 3, "Deep nets": 1, "Fashion-MNIST": 1,
                        "GAN": 2, "GAN on Fashion-MNIST": 1, "LLM": 1}
    for section, (name, n_tables) in zip(sections, expected_tables.items()):
        assert name in section.splitlines()[0]
        assert "**Command:** `python reproduce.py --quick --sections" in section
        tables = re.findall(r"^\*.+\*\n\n\| .+ \|\n\|(?:---\|)+\n((?:\| .* \|\n)+)", section, flags=re.M)
        assert len(tables) == n_tables, (name, len(tables))
        figures = re.findall(r"^!\[.+\]\((.+\.png)\)", section, flags=re.M)
        assert len(figures) == expected_figures[name], (name, figures)
        for fig in figures:
            with open(out / fig, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table1 = sections[0].split("| data set |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert [row.split("|")[1].strip() for row in table1] == list(UCI)
    assert all(re.search(r"\d+\.\d\d ± \d+\.\d\d", row) for row in table1)
    assert "lr chosen" in sections[4] and "lr chosen" in sections[5] and "Mean validation W1" in sections[6]
    # The LLM section ran the whole pipeline on the real stories260K: for CE and RLO and both methods, finetuning
    # lowers the pretrained perplexity and finetuning in quantized space lowers the PTQ one, codes unchanged.
    pipeline_rows = read_csv(str(out / "cache" / "llm" / "results.csv"))
    assert {(int(r["seed"]), r["loss"], r["quant"]) for r in pipeline_rows} == {
        (s, l, q) for s in (0, 1) for l in ("ce", "root") for q in ("ldlqRG", "e8p")}
    for r in pipeline_rows:
        assert r["qft_codes_unchanged"] == "True" and r["qft"] < r["ptq"], r
        assert r["finetuned"] < r["fp"], r
    for runs in (out / "cache" / "runs" / "digits", out / "cache" / "runs" / "fashion"):
        for run in os.listdir(runs):  # train.py runs keep their metrics, not their checkpoints
            files = set(os.listdir(runs / run))
            assert "metrics.csv" in files and not files & {"last.pt", "best.pt"}
    assert sorted(os.listdir(out / "cache")) == sorted([f"{s}.pt" for s in reproduce.SECTIONS] +
                                                       ["runs", "tasks", "fashion_generated", "gan_images_generated",
                                                        "gan_images",  # the section's scorer
                                                        "llm", "llm_log.txt"])  # the pipeline's run and its log
    # A rerun of one section (here through `python -m reproduce`) rewrites the report with all of them.
    proc = subprocess.run([sys.executable, "-m", "reproduce", *quick[2:], "--sections", "spiral"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = (out / "REPRODUCTION.md").read_text()
    assert re.findall(r"^## \d+\. (.+)$", again, flags=re.M) == titles
    assert again.split("## 2.")[0].split("## Verdict rule")[1] == text.split("## 2.")[0].split("## Verdict rule")[1]


def test_sections_without_results_are_listed_as_pending_with_their_command(tmp_path):
    out = tmp_path / "one"
    cli.main(["--quick", "--sections", "conditioning", "--jobs", "1", "--out", str(out)])
    text = (out / "REPRODUCTION.md").read_text()
    assert re.findall(r"^## \d+\. (.+)$", text, flags=re.M) == [m.TITLE for m in reproduce.SECTIONS.values()]
    assert text.count("**Setup.** Not run yet:") == len(reproduce.SECTIONS) - 1
    assert "`python reproduce.py --quick --sections llm` runs it." in text
    assert "| table1 | not run | 0.0 | `python reproduce.py --quick --sections table1` |" in text
    # where files go is not part of what produced the results
    assert "| conditioning | " in text and "`python reproduce.py --quick --sections conditioning --jobs 1` |" in text
    headline = text.split(report.HEADLINE_START, 1)[1].split(report.HEADLINE_END, 1)[0]
    assert headline.count("| pending |") == len(reproduce.SECTIONS) - 1


def square(x):
    return x * x


def test_task_results_are_kept_and_an_interrupted_run_resumes(tmp_path):
    cache = str(tmp_path / "cache")
    tasks = {("s", "a", i): (square, dict(x=i)) for i in range(3)}
    tasks[("t", "b", 0)] = (square, dict(x=5))
    done = []
    results = cli.run_tasks(tasks, 1, cache, lambda section, res, seconds: done.append((section, len(res))))
    assert results == {("s", "a", 0): 0, ("s", "a", 1): 1, ("s", "a", 2): 4, ("t", "b", 0): 25}
    assert sorted(s for s, _ in done) == ["s", "t"]  # each section reported once, when its last task ended
    # a kept result is read back, not recomputed: plant another value where the task's result is kept
    path = cli.task_path(cache, ("s", "a", 2), square, dict(x=2))
    atomic_save(dict(result=-1, seconds=7.0), path)
    os.remove(cli.task_path(cache, ("t", "b", 0), square, dict(x=5)))  # as if cut off before this one ended
    done.clear()
    again = cli.run_tasks(tasks, 1, cache, lambda section, res, seconds: done.append((section, seconds)))
    assert again[("s", "a", 2)] == -1 and again[("t", "b", 0)] == 25
    assert dict(done)["s"] >= 7.0  # the recorded seconds of kept tasks count
    changed = cli.run_tasks({("s", "a", 2): (square, dict(x=3))}, 1, cache, lambda *a: None)
    assert changed == {("s", "a", 2): 9}  # other arguments: another task


def test_llm_task_runs_the_pipeline_when_seeds_are_missing(tmp_path, monkeypatch):
    """The call make reproduce makes (llm_pipeline's full defaults, the seeds, --resume where a run was started)
    when the cached results.csv lacks a requested seed; reused as is when it holds them all."""
    import llm_pipeline

    calls = []

    def pipeline(argv):  # records the call, writes what the real pipeline would (one row per seed here)
        calls.append(argv)
        seeds = argv[1:argv.index("--out")]
        (tmp_path / "llm" / "results.csv").write_text("seed,loss\n" + "".join(f"{s},ce\n" for s in seeds))
        (tmp_path / "llm" / "args.json").write_text(json.dumps(dict(model="m/SmolLM2.gguf")))

    monkeypatch.setattr(llm_pipeline, "main", pipeline)
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "results.csv").write_text("seed,loss\n0,ce\n1,ce\n")
    out = str(tmp_path / "llm")
    got = llm.task(out, [0, 1, 2], ["--amp"], 2)
    assert calls == [["--seed", "0", "1", "2", "--out", out, "--jobs", "2", "--amp"]] and len(got["rows"]) == 3
    assert got["model"] == "SmolLM2"
    llm.task(out, [0, 1], ["--amp"], 2)
    assert len(calls) == 1 and os.path.isfile(str(tmp_path / "llm_log.txt"))
    llm.task(out, [0, 1, 2, 3], ["--amp"], 1)  # a started run (its args.json): continued, finished sub-runs reused
    assert calls[-1] == ["--seed", "0", "1", "2", "3", "--out", out, "--jobs", "1", "--amp", "--resume"]
