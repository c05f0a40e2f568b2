"""The Fashion-MNIST section of the reproduce package: its offline data check, its generated QUICK data, paired
runs across losses, the validation-only choice, epochs and seconds to the level (censored), the verdict rows
against CE and focal, and the measured time in its setup text."""
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest

from data import vision
from engine import UserError
from reproduce import SECTIONS, fashion

CTX = lambda tmp_path, **kw: SimpleNamespace(out=str(tmp_path), cache=str(tmp_path / "cache"),
                                             vision_dir=str(tmp_path / "vision"), **kw)


def test_registered_after_digits():
    names = list(SECTIONS)
    assert SECTIONS["fashion"] is fashion and names.index("fashion") == names.index("digits") + 1


def test_missing_data_is_one_line_naming_the_file(tmp_path):
    cfg = dict(fashion.FULL, seeds=5)
    with pytest.raises(UserError, match=r"^fashion: missing .*vision/FashionMNIST/raw/train-images-idx3-ubyte\.gz; "
                                        r"put Fashion-MNIST's four IDX files") as err:
        fashion.tasks(cfg, CTX(tmp_path))
    assert "\n" not in str(err.value)
    raw = tmp_path / "vision" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in fashion.RAW[:3]:
        (raw / f"{name}.gz").write_bytes(b"")
    with pytest.raises(UserError, match=r"missing .*raw/t10k-labels-idx1-ubyte\.gz;"):
        fashion.tasks(cfg, CTX(tmp_path))


def test_full_runs_are_paired_across_losses_and_read_the_vision_dir(tmp_path):
    raw = tmp_path / "vision" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in fashion.RAW:
        (raw / name).write_bytes(b"")  # plain (not gzipped) files are accepted too
    cfg = dict(fashion.FULL, seeds=5)
    jobs = fashion.tasks(cfg, CTX(tmp_path))
    assert len(jobs) == len(cfg["nets"]) * len(fashion.LOSSES) * len(cfg["lr_grid"]) * 5
    by_run = {}
    for ((net, loss, k, m, lr), seed), (_, kwargs) in jobs.items():
        a = kwargs["argv"]
        assert a[a.index("--data-dir") + 1] == str(tmp_path / "vision") and a[a.index("--threads") + 1] == "1"
        assert a[a.index("--val-split") + 1] == "2000" and a[a.index("--steps-per-epoch") + 1] == "50"
        # a seed is the same run apart from the loss: same init, data order, budget and grid value
        strip = [w for i, w in enumerate(a) if not {a[i - 1], w} & {"--loss", "--k", "--m", "--out"}]
        by_run.setdefault((net, lr, seed), set()).add(tuple(strip))
        assert a[a.index("--seed") + 1] == str(seed)
    assert all(len(v) == 1 for v in by_run.values())
    assert {loss for (_, loss, k, m, _), _ in jobs} == {"ce", "focal", "root"}
    assert {(k, m) for (_, loss, k, m, _), _ in jobs if loss == "root"} == {(8, 10), (3, 3)}


def test_quick_data_is_generated_in_the_raw_layout(tmp_path):
    cfg = dict(fashion.QUICK, seeds=2)
    jobs = fashion.tasks(cfg, CTX(tmp_path))  # no vision data: QUICK writes its own
    root = jobs[next(iter(jobs))][1]["argv"][3]
    train = vision.build_dataset("fashionmnist", root, "train", 28, aug="none")
    test = vision.build_dataset("fashionmnist", root, "test", 28, aug="none")
    assert (len(train), len(test)) == (cfg["generated"]["train"], cfg["generated"]["test"])
    # learnable: class c is the band of bright rows starting at row 2c
    bands = [int(np.flatnonzero((train.images[i] == 255).all(1))[0]) for i in range(len(train))]
    assert bands == [2 * int(c) for c in train.labels]
    before = os.path.getmtime(os.path.join(root, "FashionMNIST", "raw", fashion.RAW[0]))
    fashion.tasks(cfg, CTX(tmp_path))  # reused, not rewritten
    assert os.path.getmtime(os.path.join(root, "FashionMNIST", "raw", fashion.RAW[0])) == before


def run(val, test, seconds, cpu="2-core AMD EPYC"):
    return dict(val_acc=list(val), test_acc=list(test), seconds=list(seconds), cpu=cpu)


def test_report_chooses_on_validation_and_times_the_level(tmp_path):
    """Validation favours lr 1e-3 and test 2e-3: the report takes 1e-3. RLO k=8 m=10 reaches the level one epoch
    before CE on every seed; one RLO k=3 m=3 seed never reaches it (censored)."""
    cfg = dict(fashion.FULL, seeds=3, nets=fashion.FULL["nets"][:1], epochs={"res18": 3}, lr_grid=(1e-3, 2e-3))
    level = cfg["levels"]["res18"]
    res = {}
    for loss, k, m in fashion.LOSSES:
        for s in range(3):
            val = {("ce", 3): [level - 2, level, level + 8], ("focal", 3): [level - 2, level - 1, level],
                   ("root", 8): [level, level + 8, level + 9],
                   ("root", 3): [level - 2, level - 1, level if s else level - 5]}[(loss, k)]
            for lr, shift in ((1e-3, 0.0), (2e-3, -10.0)):
                test = [70 + s, 80 + s, (90 if loss == "root" and k == 8 else 88) + 0.1 * s - shift]
                res.setdefault(("res18", loss, k, m, lr), []).append(
                    run(np.add(val, shift), test, [10.0 * (s + 1), 20.0 * (s + 1), 30.0 * (s + 1)]))
    sec = fashion.report(cfg, res, CTX(tmp_path), "cmd")
    table, verdicts, grid = sec.tables
    rows = {r[1]: r for r in table.rows}
    assert all(r[2] == "0.001" for r in table.rows)
    assert rows["CE"][4].startswith("88.10") and rows["RLO k=8 m=10"][4].startswith("90.10")
    assert rows["CE"][6] == "2.0 ± 0.0" and rows["RLO k=8 m=10"][6] == "1.0 ± 0.0"
    assert rows["CE"][7].startswith("40.0 ") and rows["RLO k=8 m=10"][7].startswith("20.0 ")  # seeds: 20, 40, 60 s
    assert rows["RLO k=3 m=3"][6] == "≥ 3.0 (1/3 never within 3)"
    assert [r[1:4] for r in grid.rows] == [[fashion.label(*lk), f"{v:.2f}", f"{v - 10:.2f}"] for lk, v in zip(
        fashion.LOSSES, [level + 8, level, level + 9, np.mean([level - 5, level, level])])]
    # 2 RLO settings x 2 baselines x 3 measures
    assert len(verdicts.rows) == 12
    v = {(r[1], r[2], r[3]): r for r in verdicts.rows}
    acc = v[("RLO k=8 m=10", "CE", "final test acc")]
    assert acc[4].startswith("+2.00") and acc[6] == "reproduced"
    assert v[("RLO k=8 m=10", "CE", "epochs to level")][4].startswith("+1.0")
    assert v[("RLO k=8 m=10", "CE", "seconds to level")][4].startswith("+20.0")  # 10/20/30 s vs 20/40/60 s
    assert v[("RLO k=8 m=10", "focal (γ=3)", "epochs to level")][4].startswith("+2.0")
    # the censored RLO seed over-states its speed: no "reproduced" from it
    assert v[("RLO k=3 m=3", "focal (γ=3)", "epochs to level")][6] == "inconclusive"
    assert [h[-1] for h in sec.headline] == ["reproduced", "reproduced"]
    assert "Fashion-MNIST, res18, final acc" in sec.headline[0][0] and sec.headline[0][4] == 3
    # the stated time is the runs' own: 4 losses x 2 rates x (30 + 60 + 90) s
    assert "the 24 runs took 24.0 core-minutes" in sec.setup and "res18 20.0" in sec.setup
    assert "1 torch thread per run, on 2-core AMD EPYC" in sec.setup
    assert os.path.isfile(sec.figures[0][0]) and sec.figures[0][0].endswith("fashion_test_accuracy.png")


def test_one_quick_run_end_to_end(tmp_path):
    """A real train.py run on the generated data: per-epoch validation and test accuracy, increasing seconds."""
    cfg = dict(fashion.QUICK, seeds=1, nets=fashion.QUICK["nets"][:1])
    jobs = fashion.tasks(cfg, CTX(tmp_path))
    fn, kwargs = jobs[(("res18", "root", 8, 10, 1e-3), 0)]
    out = fn(**kwargs)
    epochs = cfg["epochs"]["res18"]
    assert len(out["val_acc"]) == len(out["test_acc"]) == len(out["seconds"]) == epochs
    assert all(0 <= a <= 100 for a in out["val_acc"] + out["test_acc"])
    assert 0 < out["seconds"][0] < out["seconds"][1] and "core" in out["cpu"]
    run_dir = kwargs["argv"][kwargs["argv"].index("--out") + 1]
    assert not {"last.pt", "best.pt"} & set(os.listdir(run_dir))
    assert math.isfinite(fashion.measured({("res18",): [out]})[0])

