"""Small statistics used by the study: AUROC, bootstraps, interpolation at matched trait."""

from __future__ import annotations

import numpy as np


def auroc(pos, neg) -> float:
  """P(a positive scores above a negative) + P(tie) / 2 (the Mann-Whitney AUC).

  NaN when either group is empty.
  """
  pos, neg = np.asarray(pos, float).ravel(), np.asarray(neg, float).ravel()
  if not len(pos) or not len(neg):
    return float("nan")
  diff = pos[:, None] - neg[None, :]
  return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def block_bootstrap_mean(values, n_boot: int, rng: np.random.Generator,
                         level: float = 0.95) -> tuple[float, float, float]:
  """Mean of per-block ``values`` and its percentile interval, resampling whole blocks.

  Each value is one block (here one checkpoint): blocks are drawn with replacement, so the
  interval reflects the spread between checkpoints, not within them. ``(nan, nan, nan)`` when
  there is no block.
  """
  v = np.asarray(values, float)
  v = v[~np.isnan(v)]
  if not len(v):
    return float("nan"), float("nan"), float("nan")
  idx = rng.integers(0, len(v), size=(n_boot, len(v)))
  means = v[idx].mean(axis=1)
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return float(v.mean()), float(lo), float(hi)


def interp_on_grid(x, y, grid) -> np.ndarray:
  """Piecewise-linear ``y(x)`` through the points sorted by ``x`` (ties averaged), evaluated on
  ``grid``; NaN outside ``[min x, max x]``."""
  x, y, grid = np.asarray(x, float), np.asarray(y, float), np.asarray(grid, float)
  ux = np.unique(x)
  uy = np.array([y[x == u].mean() for u in ux])
  out = np.interp(grid, ux, uy)
  out[(grid < ux[0]) | (grid > ux[-1])] = np.nan
  return out


def matched_difference(x_a, y_a, x_b, y_b, n_grid: int = 21) -> float:
  """Mean of ``y_a(x) - y_b(x)`` over the ``x`` both curves cover (NaN if they share none).

  Each curve is piecewise-linear through its points (``interp_on_grid``); the grid spans the
  overlap of their ``x`` ranges evenly (a single point if the overlap is one value).
  """
  lo = max(np.min(x_a), np.min(x_b))
  hi = min(np.max(x_a), np.max(x_b))
  if lo > hi:
    return float("nan")
  grid = np.linspace(lo, hi, n_grid)
  d = interp_on_grid(x_a, y_a, grid) - interp_on_grid(x_b, y_b, grid)
  return float(np.nanmean(d)) if np.any(~np.isnan(d)) else float("nan")
