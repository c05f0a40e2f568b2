"""The input Hessian H = E[x x^T] of a linear layer, its damping, and the proxy loss.

For a linear layer y = W x the expected squared output error of replacing W by W_hat is
tr((W_hat - W) H (W_hat - W)^T) (the proxy loss QuIP and GPTQ minimize), with H the second moment of
the layer's inputs over calibration tokens.
"""
import warnings

import torch

from engine import UserError


class HessianAccumulator:
    """Running sum of x x^T over every token vector that reaches a linear layer. Only the blocks on and
    above the diagonal are accumulated (strips of BLOCK rows: 58% of the products for 1536 columns) and
    `hessian()` mirrors them, so H is exactly symmetric."""

    BLOCK = 256

    def __init__(self, n, device="cpu"):
        self.upper = torch.zeros(n, n, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x):
        x = x.reshape(-1, x.shape[-1]).to(self.upper.device, torch.float32)
        for i in range(0, x.shape[1], self.BLOCK):
            self.upper[i:i + self.BLOCK, i:].addmm_(x[:, i:i + self.BLOCK].T, x[:, i:])
        self.count += x.shape[0]

    def hessian(self):
        if self.count == 0:
            raise UserError("no calibration tokens reached this layer")
        upper = self.upper.triu()
        return (upper + upper.triu(1).T) / self.count


def proxy_loss(W, W_hat, H, H_out=None):
    """tr((W_hat - W) H (W_hat - W)^T), in float32 (float64 inputs stay float64); with the output-side
    H_out (rows, rows) YAQA's two-sided proxy tr((W_hat - W)^T H_out (W_hat - W) H)."""
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    E = (W_hat.to(dtype) - W.to(dtype))
    EH = E @ H.to(E.device, dtype)
    return float(((EH if H_out is None else H_out.to(E.device, dtype) @ EH) * E).sum())


def check_hessian(H, n, name="H", side="columns"):
    if H.shape != (n, n):
        raise UserError(f"{name} has shape {tuple(H.shape)}, expected ({n}, {n}) for a weight with {n} {side}")
    if not torch.isfinite(H).all():
        raise UserError(f"{name} has NaN or infinite entries (overflow in the calibration pass?)")
    if bool((H.diagonal() < 0).any()):
        raise UserError(f"{name} has negative diagonal entries; it is not a second moment matrix")


def damp(H, d):
    """H + d * mean(diag(H)) * I (QuIP's and GPTQ's percdamp)."""
    mean = H.diagonal().mean()
    mean = mean if mean > 0 else torch.ones((), dtype=H.dtype, device=H.device)
    return H + (d * mean) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device) if d > 0 else H


def with_damping(percdamp, run, what="H"):
    """run(d) with d = `percdamp`, escalated x10 (with a warning saying how much was needed) while a
    factorization inside `run` finds its Hessians, damped by d (`damp`), not positive definite or the
    result is not finite. Returns (result, d used). An H that even d = 1 does not fix is a user error."""
    d = percdamp
    while True:
        try:
            out = run(d)
            if bool(torch.isfinite(out).all()):
                break
        except torch.linalg.LinAlgError:
            pass
        if d >= 1:
            raise UserError(f"{what} is not positive definite even with damping {d:g} x mean(diag(H)); "
                            "check the calibration data")
        d = max(d * 10, 1e-4)
    if d != percdamp:
        warnings.warn(f"{what} is not positive definite with percdamp={percdamp:g}; "
                      f"escalated damping to {d:g} x mean(diag(H))", stacklevel=2)
    return out, d
