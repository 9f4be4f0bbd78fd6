"""Log-linear fits: the per-layer growth factor of a quantity that grows like g^L."""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class GrowthFit:
  """`log y ~ log_intercept + x * log(factor)` fitted by least squares on the finite,
  positive points; `r2` the coefficient of determination in log space, `n` the number
  of points used (factor is NaN when n < 2)."""
  factor: float
  log_intercept: float
  r2: float
  n: int

  def predict(self, x: Sequence[float]) -> np.ndarray:
    return np.exp(self.log_intercept + np.asarray(x, np.float64) * math.log(self.factor))


def fit_growth(x: Sequence[float], y: Sequence[float]) -> GrowthFit:
  """Per-unit-x growth factor g of `y ~ C g^x` (x = depth L or normalizer count k)."""
  x = np.asarray(x, np.float64).reshape(-1)
  y = np.asarray(y, np.float64).reshape(-1)
  if x.shape != y.shape:
    raise ValueError(f"fit_growth: x has {x.size} points but y has {y.size}")
  ok = np.isfinite(x) & np.isfinite(y) & (y > 0)
  x, ly = x[ok], np.log(y[ok])
  if x.size < 2 or np.ptp(x) == 0:
    return GrowthFit(math.nan, math.nan, math.nan, int(x.size))
  slope, intercept = np.polyfit(x, ly, 1)
  resid = ly - (intercept + slope * x)
  ss_tot = float(np.sum((ly - ly.mean()) ** 2))
  r2 = 1.0 - float(np.sum(resid ** 2)) / ss_tot if ss_tot > 0 else 1.0
  return GrowthFit(float(math.exp(slope)), float(intercept), r2, int(x.size))
