"""train.py / plot.py on generated `fake` images: outputs, resume after a kill, 2-process DDP, bad input."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import models
from data import vision
import plot
import train
from engine import UserError, read_csv
from tests.helpers import ROOT, free_port

TINY = ["--dataset", "fake", "--size", "16", "--num-classes", "4", "--workers", "0", "--log-every", "3"]
VIT = TINY + ["--net", "vit_tiny", "--dimhead", "32", "--bs", "16"]
TIMING = {"epoch_seconds", "wall_seconds"}


def _rows(out):
    rows = read_csv(os.path.join(out, "metrics.csv"))
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_one_epoch_run_writes_all_outputs_and_best_loads(tmp_path):
    out = str(tmp_path / "run")
    train.main(TINY + ["--net", "res18", "--size", "8", "--fake-n", "64", "--bs", "16", "--epochs", "1",
                       "--out", out])
    assert sorted(os.listdir(out)) == ["args.json", "best.pt", "last.pt", "metrics.csv"]
    (row,) = read_csv(os.path.join(out, "metrics.csv"))
    assert list(row) == train.FIELDS and all(v != "" for k, v in row.items() if not k.startswith("val_"))
    assert row["val_loss"] == row["val_acc"] == ""  # no --val-split
    assert (row["epoch"], row["step"]) == (1, 4) and 0 <= row["test_acc"] <= 100
    assert row["lr"] == 0.0  # cosine schedule ends at zero after the last step
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["args"]["lr"] == 1e-3 and ckpt["args"]["channels_last"] is True  # convnet defaults
    best = models.build_model("res18", 4, 8, pretrained=os.path.join(out, "best.pt"))
    torch.testing.assert_close(best.state_dict()["fc.weight"], ckpt["model"]["fc.weight"], rtol=0, atol=0)


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    args = VIT + ["--fake-n", "320", "--epochs", "3", "--warmup-epochs", "0.5"]
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    train.main(args + ["--out", ref])
    expected = _rows(ref)
    assert [r["epoch"] for r in expected] == [1, 2, 3]
    assert expected[2]["train_loss"] < expected[0]["train_loss"]  # it learns

    # The killed run loads with 2 worker processes, the resumed one with none: the same data either way.
    proc = subprocess.Popen([sys.executable, "train.py"] + args + ["--out", cut, "--workers", "2"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Killed as soon as its first checkpoint exists, however long that takes on a loaded machine.
    while not os.path.exists(os.path.join(cut, "last.pt")):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed, not finished
    done = _rows(cut)
    assert 1 <= len(done) < 3

    train.main(args + ["--out", cut, "--resume"])
    assert _rows(cut) == expected  # bit-identical metrics on CPU


def test_ddp_two_processes_match_one_process(tmp_path):
    # simplevit has no BatchNorm and no dropout, so 2 ranks x 8 images == 1 process x 16 images.
    args = TINY + ["--net", "simplevit", "--dimhead", "32", "--bs", "16", "--fake-n", "96", "--epochs", "2"]
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    train.main(args + ["--out", single])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           f"--master_port={free_port()}", "train.py"] + args + ["--out", ddp]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("epoch 2/2:") == 1  # only rank 0 reports and writes
    assert sorted(os.listdir(ddp)) == ["args.json", "best.pt", "last.pt", "metrics.csv"]
    a, b = _rows(single), _rows(ddp)
    assert [r["step"] for r in b] == [6, 12]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "test_loss", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4)
        assert abs(rb["train_acc"] - ra["train_acc"]) <= 100 / 96 + 1e-9  # at most one flipped argmax
        assert abs(rb["test_acc"] - ra["test_acc"]) <= 100 / 19 + 1e-9


def test_bad_input_is_one_line_and_touches_nothing(tmp_path):
    out = str(tmp_path / "run")
    base = VIT + ["--fake-n", "32", "--epochs", "1", "--out", out]
    for argv, msg in [
        (["--dataset", "svhn"], "unknown dataset 'svhn'; choose from: cifar10, cifar100, tinyimagenet"),
        (["--net", "resnet9"], "unknown net 'resnet9'; choose from: vgg, res18"),
        (["--loss", "hinge"], "unknown loss 'hinge'; choose from: ce, focal, root, root_convex"),
        (["--k", "0"], "k must be"),
        (["--m", "-1"], "m must be"),
        (["--lr", "-1"], "--lr, --weight-decay and --momentum must be >= 0"),
        (["--epochs", "x"], "invalid int value"),
        (["--resume"], "--resume: no run to continue"),
    ]:
        with pytest.raises(UserError, match=msg):
            train.main(base + argv)
    assert not os.path.exists(out)

    train.main(base + ["--steps-per-epoch", "1"])
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    with pytest.raises(UserError, match="already holds a run; pass --resume .* or --overwrite"):
        train.main(base)
    with pytest.raises(UserError, match=r"started with other arguments: --lr 0.0001 -> 0.5"):
        train.main(base + ["--steps-per-epoch", "1", "--resume", "--lr", "0.5"])
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before

    with open(os.path.join(out, "last.pt"), "wb") as f:
        f.write(b"truncated")
    with pytest.raises(UserError, match="--resume: cannot read .*last.pt"):
        train.main(base + ["--steps-per-epoch", "1", "--resume"])
    train.main(base + ["--steps-per-epoch", "2", "--overwrite"])
    assert [r["step"] for r in _rows(out)] == [2]


def test_help_lists_every_choice(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in [*models.MODELS, "cifar10", "cifar100", "tinyimagenet", "food101", "imagenet", "fake",
                 "ce", "focal", "root", "--n_epochs", "--noamp", "--noaug", "--patch", "--dimhead"]:
        assert name in text


def test_cli_prints_one_line_and_exits_2():
    res = subprocess.run([sys.executable, "train.py", "--net", "nope"], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 2
    assert res.stderr.startswith("error: unknown net 'nope'; choose from:") and res.stderr.count("\n") == 1


def test_plot_compares_runs(tmp_path):
    runs = []
    for loss in ("ce", "root"):
        runs.append(str(tmp_path / loss))
        train.main(VIT + ["--fake-n", "32", "--epochs", "2", "--loss", loss, "--out", runs[-1]])
    png = str(tmp_path / "cmp.png")
    plot.main(runs + ["--out", png])
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1320, 960)
    assert plot.label(runs[1]) == "vit_tiny root k=3 m=3"
    with pytest.raises(UserError, match="no metrics.csv"):
        plot.main([str(tmp_path), "--out", png])
    foreign = tmp_path / "gan"
    foreign.mkdir()
    (foreign / "metrics.csv").write_text("loss,k,seed,step,modes\nce,,0,10,3\n")  # gan.py's
    with pytest.raises(UserError, match="is not a train.py metrics.csv: no column epoch, wall_seconds, test_acc"):
        plot.main([str(foreign), "--out", png])


def test_plot_marks_a_run_with_one_evaluated_epoch(tmp_path, monkeypatch):
    import matplotlib.axes

    run = tmp_path / "one"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,step,test_loss,test_acc,wall_seconds\n1,4,1.5,40.0,2.0\n")
    markers = []
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **kw: markers.append(kw.get("marker")) or real_plot(self, *a, **kw))
    plot.main([str(run), "--out", str(tmp_path / "one.png")])
    assert markers == ["o"] * 4  # one point per panel, visible


def test_val_split_holds_out_the_last_training_images(tmp_path):
    """--val-split N: training sees the first len - N images, the last N are scored beside the test set."""
    args = train.parse_args(TINY + ["--net", "res18", "--size", "8", "--fake-n", "64", "--val-split", "16",
                                    "--out", str(tmp_path / "r")])
    tr, test, val = train.build_data(args, 0, 1)
    full = vision.build_dataset("fake", "unused", "train", 8, aug="none", num_classes=args.num_classes, n=64)
    assert (len(tr), len(val), len(test)) == (48, 16, 12) and val.num_classes == tr.num_classes == args.num_classes
    assert torch.equal(val[0][0], full[48][0]) and list(tr.indices) == list(range(48))
    out = str(tmp_path / "run")
    train.main(TINY + ["--net", "res18", "--size", "8", "--fake-n", "64", "--bs", "16", "--epochs", "1",
                       "--val-split", "16", "--out", out])
    (row,) = read_csv(os.path.join(out, "metrics.csv"))
    assert row["step"] == 3 and 0 <= row["val_acc"] <= 100 and row["val_loss"] > 0
    with pytest.raises(UserError, match="--val-split 64 leaves no training images"):
        train.main(TINY + ["--net", "res18", "--size", "8", "--fake-n", "64", "--val-split", "64", "--out", out + "2"])
