"""The report's statistics: intervals, the paired verdict with its power, the censored and binomial rules,
and the validation-only choice of a learning rate. RULE states them once for the report."""
import math

import numpy as np

from engine import mean_ci

ALPHA, POWER = 0.05, 0.8

RULE = f"""Each row tests one claim "A is better than B" (higher accuracy, fewer iterations, a smaller condition
number, a lower perplexity ratio). In every section A and B share each fold or seed (the same split, initial
weights and data order), so the verdict reads the **paired differences** d_i = A_i - B_i, signed so that
d > 0 is the claimed direction:
- mean d with its two-sided 95% Student-t interval over the n folds / seeds (`reproduce.stats.paired`);
- **reproduced** when the interval lies above 0, **not reproduced** when it lies below 0 (the opposite
  effect), **inconclusive** when it covers 0 (or n < 2);
- **MDE**: the minimum detectable effect, the true mean difference a two-sided paired t-test at
  alpha {ALPHA:g} detects with {POWER:.0%} power for this n and the observed standard deviation of d (exact, from the
  noncentral t distribution). An inconclusive row therefore rules out effects larger than about its MDE
  ("no effect larger than X"); where the paper states an effect size, the report gives the number of seeds
  (folds) the paired test would need to detect it with {POWER:.0%} power at the observed spread.
- **censored rows** (iterations / epochs to a level that some run never reaches within its budget B): the
  run counts as B, a lower bound of its true value. A censored A-run makes its d an over-estimate, a censored
  B-run an under-estimate; so "reproduced" also needs every A-run to reach the level, and "not reproduced"
  every B-run; otherwise the row is inconclusive. A row with a censored run has no MDE (n/a): its
  differences are bounds, so their spread does not say what the test could detect; nor does a row whose
  differences have no spread at all (e.g. the same predictions on every fold).
- **one deterministic split** (SPECTF's own train/test files): the pairs are the shared test rows. The
  verdict is the exact two-sided McNemar test (binomial test of the b rows only A gets right against the c
  rows only B gets right, p < {ALPHA:g}), its direction the sign of b - c; its interval is the exact (Clopper-
  Pearson) 95% interval of b / (b + c) mapped to the accuracy difference (b - c) / n; its MDE is the smallest
  |b - c| / n the test would call significant with the observed b + c discordant rows.
Beside each paired verdict the unpaired one (the two groups' own 95% intervals disjoint) is kept for
comparison. The papers' numbers are shown beside ours; the verdict is on the claim (the direction), not on
matching absolute numbers, which depend on preprocessing the papers do not state.
Learning rates are chosen per loss over the same grid, on a validation split carved from the training data
(`reproduce.stats.choose`, which only ever sees validation scores); the test split only scores the choice."""


def interval(values, n=None):
    """(low, mean, high) of the 95% Student-t CI of the mean of `values`; with `n` (one deterministic
    split, `values` = [accuracy % over its n test cases]) the binomial interval."""
    x = np.asarray(values, dtype=float)
    if n is not None:
        p = x[0] / 100
        half = 196 * math.sqrt(p * (1 - p) / n)
        return x[0] - half, x[0], x[0] + half
    mean, half = mean_ci(x)
    return mean - half, mean, mean + half


def reach(values, budget, digits=1):
    """(interval, text) of iterations / epochs to a level. Runs that never reach it (inf) count as the
    budget, which can only lower the mean: the interval is [the lower end of that sample's CI, inf)."""
    x = np.asarray(values, dtype=float)
    never = int(np.isinf(x).sum())
    if not never:
        ci = interval(x)
        return ci, fmt(ci, digits)
    low, mean, _ = interval(np.where(np.isinf(x), budget, x))
    return (low, math.inf, math.inf), f"≥ {mean:.{digits}f} ({never}/{x.size} never within {budget:g})"


def verdict(a, b, higher_is_better=True):
    """The unpaired verdict on "A is better than B" from their (low, mean, high) 95% intervals: disjoint
    intervals decide, overlapping (or touching, or undefined) ones are inconclusive."""
    (a_lo, _, a_hi), (b_lo, _, b_hi) = a, b
    if any(math.isnan(v) for v in (a_lo, a_hi, b_lo, b_hi)):
        return "inconclusive"
    if not higher_is_better:
        a_lo, a_hi, b_lo, b_hi = -a_hi, -a_lo, -b_hi, -b_lo
    if a_lo > b_hi:
        return "reproduced"
    if a_hi < b_lo:
        return "not reproduced"
    return "inconclusive"


def power(effect, sd, n, alpha=ALPHA):
    """Power of the two-sided one-sample (paired) t-test at `alpha` for a true mean `effect`."""
    from scipy.stats import nct, t

    if n < 2:
        return 0.0
    crit = t.ppf(1 - alpha / 2, n - 1)
    if sd <= 1e-12 * abs(effect):  # no spread (also float noise around 0): any non-zero effect shows
        return 1.0 if effect != 0 else alpha
    nc = effect * math.sqrt(n) / sd
    # the far tail is ~0 for a large nc, where scipy can return NaN for it
    return float(np.nan_to_num(nct.sf(crit, n - 1, nc)) + np.nan_to_num(nct.cdf(-crit, n - 1, nc)))


def mde(sd, n, alpha=ALPHA, target=POWER):
    """The smallest true mean difference the paired t-test detects with `target` power (NaN for n < 2)."""
    from scipy.optimize import brentq

    if n < 2 or not np.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    hi = sd
    while power(hi, sd, n, alpha) < target:
        hi *= 2
    return float(brentq(lambda e: power(e, sd, n, alpha) - target, 0.0, hi, xtol=1e-10 * sd))


def seeds_needed(effect, sd, alpha=ALPHA, target=POWER, cap=10_000):
    """The smallest n >= 2 whose paired t-test detects `effect` with `target` power at spread `sd`
    (None beyond `cap`, or for an effect of 0)."""
    if effect == 0 or not np.isfinite(sd):
        return None
    if sd == 0:
        return 2
    lo, hi = 2, 2
    while power(abs(effect), sd, hi, alpha) < target:
        if hi >= cap:
            return None
        lo, hi = hi, min(cap, hi * 2)
    while lo < hi:  # power grows with n: the first n that reaches the target
        mid = (lo + hi) // 2
        if power(abs(effect), sd, mid, alpha) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def paired(a, b, higher_is_better=True, budget=None):
    """The paired verdict on "A is better than B" (see RULE). `a`, `b`: per fold / seed values in the same
    order; with `budget`, inf entries (a level never reached) count as the budget (censored rule).
    Returns dict(diff, lo, hi, n, sd, mde, verdict) with d signed so that > 0 is the claim."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values of different shapes {a.shape} and {b.shape}")
    a_cens, b_cens = bool(np.isinf(a).any()), bool(np.isinf(b).any())
    if budget is not None:
        a, b = np.where(np.isinf(a), budget, a), np.where(np.isinf(b), budget, b)
    d = a - b if higher_is_better else b - a
    n = d.size
    mean = float(d.mean())
    if n < 2:
        return dict(diff=mean, lo=math.nan, hi=math.nan, n=n, sd=math.nan, mde=math.nan, verdict="inconclusive")
    _, half = mean_ci(d)
    sd = float(d.std(ddof=1))
    lo, hi = mean - half, mean + half
    v = "reproduced" if lo > 0 else "not reproduced" if hi < 0 else "inconclusive"
    # A censored A-run over-states d (its true value is above the budget): it cannot support "reproduced";
    # a censored B-run under-states d: it cannot support "not reproduced".
    if (v == "reproduced" and a_cens) or (v == "not reproduced" and b_cens):
        v = "inconclusive"
    # Censored differences are bounds, not values: their spread says nothing about what the test could
    # detect (all runs censored even gives sd 0, "no effect larger than 0"), so such a row has no MDE.
    # No spread (every pair differs by the same amount, e.g. identical predictions on every fold) gives a
    # zero-width interval and an MDE of 0, which would claim too much: such a row has no MDE either.
    no_mde = a_cens or b_cens or sd == 0
    return dict(diff=mean, lo=lo, hi=hi, n=n, sd=sd, mde=math.nan if no_mde else mde(sd, n), verdict=v)


def mcnemar(a_right, b_right, alpha=ALPHA):
    """The paired verdict for one split: `a_right`, `b_right` booleans per shared test row (see RULE).
    Returns dict(diff, lo, hi, n, b, c, p, mde, verdict), differences in accuracy points."""
    from scipy.stats import binomtest

    a_right, b_right = np.asarray(a_right, dtype=bool), np.asarray(b_right, dtype=bool)
    n = a_right.size
    b = int((a_right & ~b_right).sum())
    c = int((~a_right & b_right).sum())
    m = b + c
    diff = 100.0 * (b - c) / n
    if m == 0:
        return dict(diff=0.0, lo=0.0, hi=0.0, n=n, b=0, c=0, p=1.0, mde=math.nan, verdict="inconclusive")
    test = binomtest(b, m, 0.5)
    ci = test.proportion_ci(0.95, method="exact")
    lo, hi = (100.0 * (2 * q - 1) * m / n for q in (ci.low, ci.high))
    v = "inconclusive" if test.pvalue >= alpha else "reproduced" if b > c else "not reproduced"
    # the smallest imbalance |b - c| among m discordant rows that the exact test calls significant
    smallest = next((2 * j - m for j in range((m + 1) // 2, m + 1) if binomtest(j, m, 0.5).pvalue < alpha), None)
    return dict(diff=diff, lo=lo, hi=hi, n=n, b=b, c=c, p=float(test.pvalue),
                mde=math.nan if smallest is None else 100.0 * smallest / n, verdict=v)


def choose(grid, val_scores, higher_is_better=True):
    """The grid value with the best validation score (`val_scores`: {value: score}); ties go to the value
    listed first in `grid`. It is given validation scores only, so the test split cannot choose."""
    missing = [g for g in grid if g not in val_scores]
    if missing:
        raise ValueError(f"no validation score for {missing}")
    sign = 1 if higher_is_better else -1
    return max(grid, key=lambda g: (sign * val_scores[g], -grid.index(g)))


def fmt(ci, digits=2):
    lo, mean, hi = ci
    if math.isnan(hi):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(hi - lo) / 2:.{digits}f}"


def fmt_g(ci):
    lo, mean, hi = ci
    return f"{mean:.4g}" if math.isnan(hi) else f"{mean:.4g} ± {(hi - lo) / 2:.2g}"


def fmt_paired(p, digits=2):
    """'+d [lo, hi]' of a paired result."""
    if math.isnan(p["lo"]):
        return f"{p['diff']:+.{digits}f} (n={p['n']})"
    return f"{p['diff']:+.{digits}f} [{p['lo']:+.{digits}f}, {p['hi']:+.{digits}f}]"


def fmt_mde(p, digits=2):
    return "n/a" if math.isnan(p["mde"]) else f"{p['mde']:.{digits}f}"


def paired_cells(p, digits=2):
    """[paired diff (95% CI), MDE, verdict] cells of a table row; inconclusive rows say what they rule out."""
    v = p["verdict"]
    if v == "inconclusive" and not math.isnan(p["mde"]):
        v = f"inconclusive (no effect larger than {p['mde']:.{digits}f})"
    return [fmt_paired(p, digits), fmt_mde(p, digits), v]
