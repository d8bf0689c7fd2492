"""Power-law fits y ≈ c · x^p by least squares on log y = log c + p log x."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PowerLawFit:
    exponent: float  # p
    coefficient: float  # c
    r2: float  # coefficient of determination of the log-log fit

    def __call__(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.coefficient * np.asarray(x, dtype=float) ** self.exponent


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLawFit:
    """Fit y ≈ c x^p; every x and y must be positive and finite, with at least two x whose logs differ by more
    than rounding (x = 1 and 1 + 1e-15 would give an exponent of 6e14); ValueError otherwise."""
    try:
        xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    except OverflowError as e:  # an int beyond the float range (10**400)
        raise ValueError(f"fit_power_law: x and y must be within the float range ({e})") from None
    if xa.ndim != 1 or xa.shape != ya.shape:
        raise ValueError(f"fit_power_law: x and y must be 1-D sequences of one length; got shapes {xa.shape} and "
                         f"{ya.shape}")
    ok = xa.size >= 2 and np.all(xa > 0) and np.all(ya > 0)
    if not ok or not np.all(np.isfinite(xa)) or not np.all(np.isfinite(ya)) or np.ptp(xa) == 0:
        raise ValueError(f"fit_power_law: need >= 2 distinct positive x and positive y; got x={xa.tolist()}, "
                         f"y={ya.tolist()}")
    lx, ly = np.log(xa), np.log(ya)
    if np.ptp(lx) <= 64 * np.finfo(float).eps * max(1.0, float(np.abs(lx).max())):  # the flat-y tolerance, on x
        raise ValueError(f"fit_power_law: the x values are equal up to rounding (log x spans {np.ptp(lx):.3g}); "
                         f"got x={xa.tolist()}")
    p, logc = np.polyfit(lx, ly, 1)
    resid = ly - (p * lx + logc)
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    # y constant up to rounding: nothing to explain, and the residuals are rounding too (R² would be noise: 1, 0, -10)
    flat = ss_tot <= (64 * np.finfo(float).eps * max(1.0, float(np.abs(ly).max()))) ** 2 * ly.size
    r2 = 1.0 if flat else 1.0 - float(np.sum(resid**2)) / ss_tot
    return PowerLawFit(float(p), float(np.exp(logc)), r2)
