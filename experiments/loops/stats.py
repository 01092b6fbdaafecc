"""Small statistics used by the study: AUROC, intervals over seeds, curves at matched trait."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps


def auroc(pos, neg) -> float:
  """P(a positive scores above a negative) + P(tie) / 2 (the Mann-Whitney AUC).

  NaN when either group is empty.
  """
  pos, neg = np.asarray(pos, float).ravel(), np.asarray(neg, float).ravel()
  if not len(pos) or not len(neg):
    return float("nan")
  diff = pos[:, None] - neg[None, :]
  return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def t_interval(values, level: float = 0.95) -> dict:
  """Mean of per-seed ``values`` (NaN ones dropped) with its Student-t interval.

  The seed is the unit: ``mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)`` over the ``n`` seeds.
  ``lo``/``hi`` are NaN with fewer than 2 seeds.
  """
  v = np.asarray(values, float)
  v = v[~np.isnan(v)]
  n = len(v)
  if not n:
    return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
  m = float(v.mean())
  if n < 2:
    return {"mean": m, "lo": float("nan"), "hi": float("nan"), "n": 1}
  half = float(sps.t.ppf((1 + level) / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
  return {"mean": m, "lo": m - half, "hi": m + half, "n": n}


def welch_interval(a, b, level: float = 0.95) -> dict:
  """Difference of means ``mean(a) - mean(b)`` of two independent sets of seeds, with the
  Welch-Satterthwaite t interval (NaN with fewer than 2 seeds on a side)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  a, b = a[~np.isnan(a)], b[~np.isnan(b)]
  if len(a) < 2 or len(b) < 2:
    m = float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")
    return {"mean": m, "lo": float("nan"), "hi": float("nan"), "n": [len(a), len(b)]}
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  m = float(a.mean() - b.mean())
  se = math.sqrt(va + vb)
  if se == 0:
    return {"mean": m, "lo": m, "hi": m, "n": [len(a), len(b)]}
  df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
  half = float(sps.t.ppf((1 + level) / 2, df) * se)
  return {"mean": m, "lo": m - half, "hi": m + half, "n": [len(a), len(b)]}


def line_at(x, y, grid) -> np.ndarray:
  """Piecewise-linear ``y(x)`` through the points sorted by ``x`` (ties averaged), evaluated on
  ``grid``, extended linearly beyond the ends by the end segments (a constant for one point)."""
  x, y, grid = np.asarray(x, float), np.asarray(y, float), np.asarray(grid, float)
  ux = np.unique(x)
  uy = np.array([y[x == u].mean() for u in ux])
  if len(ux) == 1:
    return np.full(grid.shape, uy[0])
  out = np.interp(grid, ux, uy)
  lo, hi = grid < ux[0], grid > ux[-1]
  out[lo] = uy[0] + (grid[lo] - ux[0]) * (uy[1] - uy[0]) / (ux[1] - ux[0])
  out[hi] = uy[-1] + (grid[hi] - ux[-1]) * (uy[-1] - uy[-2]) / (ux[-1] - ux[-2])
  return out


def common_range(x_a, x_b) -> tuple[float, float] | None:
  """``[max(min x_a, min x_b), min(max x_a, max x_b)]``, or None if the ranges do not meet."""
  lo, hi = max(np.min(x_a), np.min(x_b)), min(np.max(x_a), np.max(x_b))
  return (float(lo), float(hi)) if lo <= hi else None


def matched_difference(x_a, y_a, x_b, y_b, span: tuple[float, float], n_grid: int = 21
                       ) -> float:
  """Mean of ``y_a(x) - y_b(x)`` over ``n_grid`` points spread evenly over ``span``, each curve
  from ``line_at`` through its points."""
  grid = np.linspace(span[0], span[1], n_grid)
  return float(np.mean(line_at(x_a, y_a, grid) - line_at(x_b, y_b, grid)))


def lam_for_target(lams, density, target: float) -> tuple[float, bool]:
  """The lam at which the trait density reaches ``target``, interpolating linearly in log lam
  between pilot points; density is made non-increasing in lam first (running minimum), since a
  stronger barrier should not raise the trait. Returns ``(lam, clamped)``: ``clamped`` when the
  target lies outside the pilot's range and the nearest end's lam is returned.
  """
  order = np.argsort(lams)
  lam = np.asarray(lams, float)[order]
  dens = np.minimum.accumulate(np.asarray(density, float)[order])
  if target >= dens[0]:
    return float(lam[0]), bool(target > dens[0])
  if target <= dens[-1]:
    return float(lam[-1]), bool(target < dens[-1])
  # First segment that crosses the target (dens[i] > target >= dens[i + 1]).
  i = int(np.flatnonzero((dens[:-1] > target) & (dens[1:] <= target))[0])
  w = (dens[i] - target) / (dens[i] - dens[i + 1])
  return float(np.exp(np.log(lam[i]) + w * (np.log(lam[i + 1]) - np.log(lam[i])))), False
