"""llm_pipeline.py end to end on a tiny random Llama and generated text (the real default model, SmolLM2-135M,
is run by `make llm-demo` and the report's LLM section): e8p and ldlqRG rows, what a seed changes and what the
losses share, learning rates chosen on the validation text only, the process pool, resuming, CLI errors."""
import csv
import json
import os
import shutil

import pytest
import torch

import ft_opt
import llm_pipeline
import lm
import opt
from engine import UserError
from tests.lm_fixtures import make_text


def tiny_argv(model, tmp, out, *extra):
    """Training text and test text in `tmp` (written once) and the pipeline's argv for the tiny `model`."""
    train, test = os.path.join(tmp, "train.txt"), os.path.join(tmp, "test.txt")
    if not os.path.isfile(train):
        with open(train, "w") as f:
            f.write(make_text(40, seed=1))
        with open(test, "w") as f:
            f.write(make_text(8, seed=2))
    return ["--model", model, "--train-file", train, "--eval-file", test, "--wbits", "2", "4",
            "--seqlen", "32", "--eval-seqlen", "32", "--eval-windows", "4", "--valid-fraction", "0.25",
            "--nsamples", "4", "--ft-steps", "4", "--qft-steps", "4", "--bs", "4", "--threads", "1", "--device", "cpu",
            "--out", out, *extra]


@pytest.fixture(scope="module")
def run(tiny_llama_dir, tmp_path_factory):
    """One two-seed run with ldlqRG and e8p and two-value grids, recording per sub-run (by its --out
    folder name) the files it read, its training batches and its calibration windows."""
    tmp = str(tmp_path_factory.mktemp("llm_pipeline"))
    out = os.path.join(tmp, "run")
    argv = tiny_argv(tiny_llama_dir, tmp, out, "--seeds", "0", "1", "--lr", "1e-3", "3e-3", "--qft-lr", "1e-3", "3e-3")
    rec, current = {}, [None]

    def entering(main, flag):
        def wrapped(argv):
            current[0] = os.path.basename(argv[argv.index(flag) + 1])
            rec[current[0]] = {"argv": argv, "read": [], "batches": [], "calib": None}
            return main(argv)
        return wrapped

    read_text_file, shift_labels, calibration_windows = lm.read_text_file, lm.shift_labels, lm.calibration_windows

    def reading(path):
        (rec[current[0]]["read"] if current[0] else rec.setdefault("pipeline", [])).append(os.path.realpath(path))
        return read_text_file(path)

    def shifting(input_ids, *a, **k):
        rec[current[0]]["batches"].append(input_ids.clone())
        return shift_labels(input_ids, *a, **k)

    def calibrating(ids, nsamples, seqlen, seed=0, what=""):
        rec[current[0]]["calib"] = calibration_windows(ids, nsamples, seqlen, seed, what)
        return rec[current[0]]["calib"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ft_opt, "main", entering(ft_opt.main, "--out"))
        mp.setattr(opt, "main", entering(opt.main, "--save"))
        mp.setattr(lm, "read_text_file", reading)
        mp.setattr(lm, "shift_labels", shifting)
        mp.setattr(lm, "calibration_windows", calibrating)
        rows = llm_pipeline.main(argv)
    return dict(rows=rows, rec=rec, out=out, argv=argv, test=os.path.realpath(argv[argv.index("--eval-file") + 1]))


def test_rows_for_both_methods_with_the_chosen_learning_rates_and_the_packed_round_trip(run):
    rows, out = run["rows"], run["out"]
    assert len(rows) == 2 * 2 * 2 * 2  # seeds x losses x methods x bit widths
    assert {(r["quant"], r["wbits"]) for r in rows} == {(q, b) for q in ("ldlqRG", "e8p") for b in (2, 4)}
    assert all(r["qft_codes_unchanged"] and r["incoh"] == "on" for r in rows)
    assert {"args.json", "results.csv", "selection.csv", "table.md", "pipeline.png"} <= set(os.listdir(out))
    with open(os.path.join(out, "results.csv")) as f:
        saved = list(csv.DictReader(f))
    assert len(saved) == 16 and list(saved[0]) == llm_pipeline.FIELDS
    assert len({(r["seed"], r["loss"], r["quant"], r["wbits"], r["incoh"]) for r in saved}) == 16
    with open(os.path.join(out, "selection.csv")) as f:
        sel = list(csv.DictReader(f))
    for r in rows:  # results carry the value chosen for its loss (and method), the one with the lowest valid ppl
        assert r["ptq_vs_ft"] == pytest.approx(r["ptq"] / r["finetuned"])
        assert r["finetuned"] < r["fp"]  # the fp finetuning learned the tiny language
        ft = [s for s in sel if s["stage"] == "ft" and s["loss"] == r["loss"]]
        qft = [s for s in sel if s["stage"] == "qft" and (s["loss"], s["quant"]) == (r["loss"], r["quant"])]
        assert len(ft) == len(qft) == 2 and {s["wbits"] for s in qft} == {"2"}  # tuned at the lowest width
        assert r["lr"] == float(min(ft, key=lambda s: float(s["valid_ppl"]))["lr"])
        assert r["qft_lr"] == float(min(qft, key=lambda s: float(s["valid_ppl"]))["lr"])
    table = open(os.path.join(out, "table.md")).read()
    assert table.count("| ce |") == 4 and table.count("| root |") == 4 + 4  # 4 summary rows each + 4 paired rows
    assert "Paired differences" in table and "±" in table
    assert len({r["fp"] for r in rows}) == 1  # every row starts from the same base model and test windows
    with pytest.raises(UserError, match="already holds a run"):
        llm_pipeline.main(run["argv"])


def test_a_seed_changes_data_order_calibration_and_rotations_and_the_losses_share_them(run):
    rec, out = run["rec"], run["out"]

    def rotations(name):
        with open(os.path.join(out, name, "config.json")) as f:
            return {k: v["seed"] for k, v in json.load(f)["quantization_config"]["layers"].items()}

    for stage in ("ft_{}_s{}", "qft_{}_s{}_e8p_w2_incohon", "qft_{}_s{}_ldlqRG_w4_incohon"):
        ce0, rlo0, ce1 = (rec[stage.format(l, s)]["batches"] for l, s in (("ce", 0), ("root", 0), ("ce", 1)))
        assert len(ce0) == 4 and all(torch.equal(a, b) for a, b in zip(ce0, rlo0))  # same order for both losses
        assert not torch.equal(torch.cat(ce0), torch.cat(ce1))  # another seed, another order
    for method in ("e8p", "ldlqRG"):
        name = "ptq_{}_s{}_" + method + "_w2_incohon"
        ce0, rlo0, ce1 = (name.format(l, s) for l, s in (("ce", 0), ("root", 0), ("ce", 1)))
        assert torch.equal(rec[ce0]["calib"], rec[rlo0]["calib"])
        assert not torch.equal(rec[ce0]["calib"], rec[ce1]["calib"])
        assert rotations(ce0) == rotations(rlo0) and set(rotations(ce0).values()).isdisjoint(rotations(ce1).values())
    # the tuning seed is none of the reported seeds
    assert not torch.equal(rec["ft_ce_lr0.001"]["batches"][0], rec["ft_ce_s0"]["batches"][0])


def test_learning_rates_are_chosen_on_the_held_out_tail_of_the_training_text_never_on_the_test_text(run):
    rec, out, test = run["rec"], run["out"], run["test"]
    data = os.path.join(out, "data")
    train, valid = (os.path.realpath(os.path.join(data, f)) for f in ("train.txt", "valid.txt"))
    original = open(run["argv"][run["argv"].index("--train-file") + 1]).read()
    assert open(train).read() + open(valid).read() == original and open(valid).read().strip()
    tuning = [name for name, r in rec.items() if name != "pipeline" and os.path.join(out, "tune") in r["argv"][
        r["argv"].index("--out" if "--out" in r["argv"] else "--save") + 1]]
    assert len(tuning) == 2 * 2 + 2 * 2 + 2 * 2 * 2  # fp grid + PTQ per (loss, method) + QFT grid
    for name in tuning:
        assert test not in rec[name]["read"], name  # the selection never opens the test text
        assert set(rec[name]["read"]) == {train, valid}, name  # trained / calibrated on train, scored on valid
    reported = [name for name in rec if name != "pipeline" and name not in tuning]
    assert len(reported) == 2 * 2 + 16 * 2
    assert all(set(rec[name]["read"]) == {train, test} for name in reported)  # valid rows never trained on


def test_selection_ignores_the_test_text(tiny_llama_dir, tmp_path):
    """The same selection whatever the test text holds: run it with two different test files."""
    chosen = []
    for test_seed in (2, 3):
        argv = tiny_argv(tiny_llama_dir, str(tmp_path), str(tmp_path / f"run{test_seed}"), "--losses", "ce", "--quant", "e8p",
                         "--wbits", "2", "--lr", "1e-3", "1e-2", "--qft-lr", "3e-3", "3e-2", "--seeds", "0")
        test = tmp_path / f"test{test_seed}.txt"
        test.write_text(make_text(8, seed=test_seed) if test_seed == 2 else "zq xv " * 400)
        argv[argv.index("--eval-file") + 1] = str(test)
        args = llm_pipeline.parse_args(argv)
        os.makedirs(args.out)
        train, valid = llm_pipeline.split_texts(args, os.path.join(args.out, "data"))
        with llm_pipeline.runner(1, 1) as run:
            lrs, qft_lrs, rows = llm_pipeline.select_lrs(args, train, valid, run)
        chosen.append(([(r["stage"], r["lr"], r["valid_ppl"]) for r in rows], lrs, qft_lrs))
    assert chosen[0] == chosen[1]
    assert [stage for stage, _, _ in chosen[0][0]] == ["ft", "ft", "ptq", "qft", "qft"]
    assert len({ppl for _, _, ppl in chosen[0][0]}) == 5


def test_a_diverged_grid_value_is_never_chosen():
    nan, inf = float("nan"), float("inf")
    assert llm_pipeline.choose([(1e-3, nan), (3e-3, 5.0), (1e-2, 4.0)]) == 1e-2
    assert llm_pipeline.choose([(1e-3, 7.0), (3e-3, inf), (1e-2, nan)]) == 1e-3
    assert llm_pipeline.choose([(1e-3, 4.0), (3e-3, 4.0)]) == 1e-3


@pytest.mark.slow
def test_parallel_jobs_give_the_same_rows(tiny_llama_dir, tmp_path):
    rows = []
    for jobs in ("1", "2"):
        argv = tiny_argv(tiny_llama_dir, str(tmp_path), str(tmp_path / f"jobs{jobs}"), "--losses", "ce", "root", "--quant", "e8p",
                         "--wbits", "2", "--lr", "3e-3", "--qft-lr", "3e-3", "--seeds", "0", "--jobs", jobs)
        rows.append(llm_pipeline.main(argv))
    assert len(rows[0]) == 2
    timing = ("ptq_seconds", "ft_wall", "ptq_wall", "qft_wall")
    for a, b in zip(*rows):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}


def test_a_trellis_method_with_block_ft_runs_end_to_end(tiny_llama_dir, tmp_path):
    out = tmp_path / "qtip"
    argv = tiny_argv(tiny_llama_dir, str(tmp_path), str(out), "--losses", "ce", "--quant", "qtip1mad", "--wbits", "2",
                     "--lr", "3e-3", "--qft-lr", "3e-3", "--seeds", "0", "--block-ft", "2")
    [row] = llm_pipeline.main(argv)
    assert (row["quant"], row["wbits"]) == ("qtip1mad", 2) and row["qft_codes_unchanged"] and row["qft"] < row["ptq"]
    with open(out / "ptq_ce_s0_qtip1mad_w2_incohon" / "config.json") as f:
        config = json.load(f)["quantization_config"]
    assert config["block_ft"]["steps"] == 2 and {s["codebook"] for s in config["layers"].values()} == {"trellis"}


def test_resume_reuses_finished_sub_runs_and_reruns_an_interrupted_one(tiny_llama_dir, tmp_path):
    out = tmp_path / "resumed"
    argv = tiny_argv(tiny_llama_dir, str(tmp_path), str(out), "--losses", "ce", "--quant", "e8p", "--wbits", "2",
                     "--lr", "3e-3", "--qft-lr", "3e-3")
    [first] = llm_pipeline.main(argv + ["--seeds", "0"])
    # plant a value in seed 0's finished fp run: a resumed pipeline reads it back instead of finetuning again
    metrics = out / "ft_ce_s0" / "metrics.json"
    planted = dict(json.load(open(metrics)), ppl_after=123.0)
    metrics.write_text(json.dumps(planted))
    # and leave seed 0's QFT as an interrupted run would (its checkpoint still there): it is run again
    qft = out / "qft_ce_s0_e8p_w2_incohon"
    (qft / "checkpoint.pt").write_bytes(b"")
    rows = llm_pipeline.main(argv + ["--seeds", "0", "1", "--resume"])
    assert [r["seed"] for r in rows] == [0, 1]
    assert rows[0]["finetuned"] == 123.0 and rows[0]["ptq"] == first["ptq"] and rows[0]["qft"] == first["qft"]
    assert not (qft / "checkpoint.pt").exists()
    assert json.load(open(out / "args.json"))["seeds"] == [0, 1]
    with pytest.raises(UserError, match=r"--resume: .* was started with other arguments: --ft-steps 4 -> 5"):
        llm_pipeline.main(argv + ["--seeds", "0", "--resume", "--ft-steps", "5"])
    with pytest.raises(UserError, match="pass one of them"):
        llm_pipeline.main(argv + ["--resume", "--overwrite"])


def test_resume_quantizes_the_tuning_model_the_selection_now_chooses(tiny_llama_dir, tmp_path):
    """The tuning PTQ and QFT runs are named by the fp learning rate they start from: when a resumed run
    chooses another one, they are made from that model, not read back from the old choice's."""
    out = tmp_path / "regrown"
    argv = tiny_argv(tiny_llama_dir, str(tmp_path), str(out), "--losses", "ce", "--quant", "e8p", "--wbits", "2",
                     "--lr", "1e-3", "3e-3", "--qft-lr", "3e-3", "1e-2", "--seeds", "0")
    llm_pipeline.main(argv)
    with open(out / "selection.csv") as f:
        fp = [r for r in csv.DictReader(f) if r["stage"] == "ft"]
    other = next(r["lr"] for r in fp if r["chosen"] == "False")
    metrics = out / "tune" / f"ft_ce_lr{float(other):g}" / "metrics.json"
    metrics.write_text(json.dumps(dict(json.load(open(metrics)), ppl_after=0.5)))  # now the best on validation
    llm_pipeline.main(argv + ["--resume"])
    ptq = out / "tune" / f"ptq_ce_lr{float(other):g}_e8p_w2_incohon"
    assert json.load(open(ptq / "quant_report.json"))["args"]["model"] == str(metrics.parent)


def test_resume_without_model_weights_reuses_finished_chains_and_reruns_the_rest(tiny_llama_dir, tmp_path):
    """A clone of the repository holds a run's results, not its models: finished chains are reused from their
    results; a chain whose QFT is missing runs again from the fp finetuning, whose weights it needs."""
    out = tmp_path / "clone"
    argv = tiny_argv(tiny_llama_dir, str(tmp_path), str(out), "--losses", "ce", "--quant", "e8p", "--wbits", "2",
                     "--lr", "3e-3", "--qft-lr", "3e-3", "--seeds", "0", "1")
    first = llm_pipeline.main(argv)
    for folder, _, files in os.walk(out):
        for f in files:
            if f.endswith(".safetensors"):
                os.remove(os.path.join(folder, f))
    shutil.rmtree(out / "qft_ce_s1_e8p_w2_incohon")  # seed 1 was stopped before its QFT
    again = llm_pipeline.main(argv + ["--resume"])
    assert again[0] == first[0]  # seed 0 read back
    assert not any(f.endswith(".safetensors") for f in os.listdir(out / "ft_ce_s0"))  # and not run again
    assert any(f.endswith(".safetensors") for f in os.listdir(out / "ft_ce_s1"))  # seed 1 finetuned again
    assert again[1]["ptq"] == pytest.approx(first[1]["ptq"], rel=1e-4) and again[1]["qft"] == pytest.approx(
        first[1]["qft"], rel=1e-4)  # to the same results: its data order, calibration and rotations are the seed's


def test_user_errors_are_one_line(tiny_llama_dir, tmp_path):
    argv = tiny_argv(tiny_llama_dir, str(tmp_path), str(tmp_path / "x"))
    test = argv[argv.index("--eval-file") + 1]
    with pytest.raises(UserError, match="--valid-file .* is the --eval-file text"):
        llm_pipeline.main(argv + ["--valid-file", test])
    copy = tmp_path / "copy.txt"
    copy.write_text(open(test).read())
    with pytest.raises(UserError, match="is the --eval-file text"):  # a copy of the test text is the test text
        llm_pipeline.main(argv + ["--valid-file", str(copy)])
    for flags, message in ((["--valid-fraction", "1"], "--valid-fraction must lie strictly between 0 and 1"),
                           (["--lr", "1e-3", "0"], "--lr values must be finite numbers > 0"),
                           (["--qft-lr", "nan"], "--qft-lr values must be finite"),
                           (["--jobs", "0"], "--jobs"), (["--quant", "e9p"], "invalid choice"),
                           (["--block-ft", "0"], "--block-ft must be >= 1"), (["--block-ft-lr", "0"], "--block-ft-lr")):
        with pytest.raises(UserError, match=message):
            llm_pipeline.main(argv + flags)
    train = argv[argv.index("--train-file") + 1]
    with pytest.raises(UserError, match="is the --train-file text"):
        llm_pipeline.main(argv + ["--valid-file", train])
    one_line = tmp_path / "one.txt"
    one_line.write_text("a single line of text\n")
    with pytest.raises(UserError, match="too few to hold out"):
        llm_pipeline.main(argv + ["--train-file", str(one_line)])
    with pytest.raises(UserError, match="--eval-file .* does not exist"):
        llm_pipeline.main(["--model", str(tmp_path), "--train-file", __file__, "--eval-file", str(tmp_path / "no.txt"),
                           "--out", str(tmp_path / "x")])
