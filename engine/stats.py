"""Summaries a reviewer can check: mean and Student-t confidence interval over seeds or folds."""
import math

import numpy as np


def mean_ci(values, level=0.95):
    """(mean, half-width of the two-sided `level` Student-t interval); half-width NaN for one value."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci of no values")
    if x.size == 1:
        return float(x[0]), math.nan
    from scipy.stats import t

    return float(x.mean()), float(t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))


def format_ci(values, digits=3):
    """'mean ± half-width' (just the mean for a single value), `digits` significant digits."""
    mean, half = mean_ci(values)
    return f"{mean:.{digits}g}" if math.isnan(half) else f"{mean:.{digits}g} ± {half:.2g}"
