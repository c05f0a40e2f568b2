"""The image-GAN section of the reproduce package on synthetic results: the learning rate chosen on the
validation FD only, paired verdicts in the right direction for FD (lower is better) and coverage, the
headline row per data size, the samples figure, and the measured time and scorer accuracy in its setup."""
from types import SimpleNamespace

import numpy as np

from reproduce import SECTIONS, gan_images

CFG = dict(gan_images.FULL, seeds=5, lr_grid=(1e-4, 2e-4))


def run(fd_val, fd_test, classes, seed):
    samples = np.zeros((64, 1, 28, 28), dtype=np.uint8)
    return dict(fd_val=fd_val, fd_test=fd_test, fd_floor=1.25, classes=classes, top_share=0.2, scorer_acc=90.5, seconds=60.0,
                samples=samples, seed=seed)


def results():
    rng = np.random.default_rng(0)
    res = {}
    for n in CFG["sizes"]:
        for loss in gan_images.LOSSES:
            for lr in CFG["lr_grid"]:
                # lr 2e-4 has the better validation FD; its test FD is what the rows report. RLO is lower by 1.0
                # on every seed at 1,000 images and equal (up to noise) at 55,000.
                base = 10.0 + (0.0 if lr == 2e-4 else 5.0)
                gain = 1.0 if (loss == "root" and n == 1000) else 0.0
                noise = (lambda: rng.normal(0, 0.5)) if n == 55000 else (lambda: 0.0)
                res[(n, loss, lr)] = [run(base + s * 0.1, base + s + noise() - gain, 9 + (loss == "root"), s)
                                      for s in range(CFG["seeds"])]
    return res


def test_registered_after_the_2d_gan():
    names = list(SECTIONS)
    assert SECTIONS["gan_images"] is gan_images and names.index("gan_images") == names.index("gan") + 1


def test_report_chooses_on_validation_and_pairs_per_seed(tmp_path):
    sec = gan_images.report(CFG, results(), SimpleNamespace(out=str(tmp_path)), "python reproduce.py --sections gan_images")
    table, selection = sec.tables
    assert [row[-1] for row in selection.rows] == ["0.0002"] * 4
    rows = {(r[0], r[1]): r for r in table.rows}
    fd_small, fd_full = rows[("1,000", "FD to the test images")], rows[("55,000", "FD to the test images")]
    assert fd_small[4].startswith("+1.000 ") and fd_small[6] == "reproduced"
    assert fd_full[6].startswith("inconclusive")
    assert rows[("1,000", "classes covered (of 10)")][6] == "reproduced"  # 10 vs 9 on every seed
    assert [h[0] for h in sec.headline] == ["GAN: RLO lowers the FD (1,000 Fashion-MNIST images)",
                                            "GAN: RLO lowers the FD (55,000 Fashion-MNIST images)"]
    assert "validation to the test images themselves (a perfect generator's score, up to sampling) is 1.25" in sec.notes[0]
    assert "90.50% test accuracy" in sec.setup and "40 runs, 40.0 core-minutes" in sec.setup
    (path, _, _), = sec.figures
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
