"""Small generated 2-D classification sets (paper Figure 2), seeded and returned as `data.tabular.Tabular`.

- `spiral`: two interleaved spiral arms, one per class (the paper's spiral benchmark for FCNs).
- `gaussians`: a mixture of Gaussian blobs per class, alternating on a ring (not linearly separable).
"""
import numpy as np

from engine.errors import UserError

from .tabular import Tabular


def spiral(n=1500, turns=1.5, noise=0.04, seed=0):
    """`n` points on two arms r = t / (2 pi turns), angle t (+ pi for class 1), t ~ 2 pi turns sqrt(U)
    (uniform density along the arm area), plus isotropic Gaussian noise of std `noise`."""
    if n < 2 or turns <= 0 or noise < 0:
        raise UserError(f"spiral needs n >= 2, turns > 0, noise >= 0; got n={n}, turns={turns}, noise={noise}")
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    t = 2 * np.pi * turns * np.sqrt(rng.random(n))
    r = t / (2 * np.pi * turns)
    angle = t + np.pi * y
    X = np.stack([r * np.cos(angle), r * np.sin(angle)], 1) + noise * rng.standard_normal((n, 2))
    return Tabular(X, y.astype(np.int64), ["0", "1"], "spiral")


def gaussians(n=1500, blobs=8, radius=1.0, std=0.25, seed=0):
    """`blobs` Gaussians (std `std`) evenly spaced on a circle of `radius`, classes alternating."""
    if n < 2 or blobs < 2 or blobs % 2 or std <= 0:
        raise UserError(f"gaussians needs n >= 2, an even blobs >= 2 and std > 0; got n={n}, blobs={blobs}, std={std}")
    rng = np.random.default_rng(seed)
    blob = rng.integers(0, blobs, n)
    angle = 2 * np.pi * blob / blobs
    X = radius * np.stack([np.cos(angle), np.sin(angle)], 1) + std * rng.standard_normal((n, 2))
    return Tabular(X, (blob % 2).astype(np.int64), ["0", "1"], "gaussians")


SYNTHETIC = {"spiral": spiral, "gaussians": gaussians}
