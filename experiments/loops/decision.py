"""The decision rule of the study, fixed before the full run (the report reads it from here).

A tail aggregate (rmse, p95 or cvar95) *wins* over mean only if both hold:

1. Closed loop: its loop rate at matched trait is lower than mean's. The seed-paired difference
   (tail - mean) in final-round loop rate (any kind: phrase loop, other loop or near-loop),
   averaged over the phrase densities both curves reach (each seed's curve is piecewise-linear
   through its four strictness levels), has a 95% bootstrap interval entirely below 0
   (resampling held-out prompts, paired across arms, and seeds).
2. Detection: its within-checkpoint AUROC of real loops (any kind) against clean trait-bearing
   completions is higher than mean's: the checkpoint-blocked 95% bootstrap interval of the
   per-checkpoint AUROC difference (tail - mean) lies entirely above 0.

Mean wins over that tail aggregate if both intervals lie entirely on the other side. Anything
else is *undecided* by this study. The positive control must pass for the detection half to
count at all: on the planted control (the design note's regime), p95's AUROC must be at least
``POSITIVE_CONTROL_MIN_AUROC`` with its difference to mean's interval above 0; if it fails, the
pipeline could not have seen a tail effect, and the verdict is "no test".
"""

from __future__ import annotations

import math

TAIL_AGGS: tuple[str, ...] = ("rmse", "p95", "cvar95")
"""Compared, one by one, against ``"mean"``."""

LEVEL: float = 0.95
"""Two-sided level of every bootstrap interval."""

LOOP_METRIC: str = "loop_rate"
"""The closed-loop outcome: share of final-round completions with a loop of any kind."""

TRAIT_METRIC: str = "phrase_density"
"""The trait axis: occurrences of the phrase per 64 bytes of completion."""

DETECT_KIND: str = "any_loop"
"""The detection outcome: real loops of any kind against clean trait-bearing completions."""

POSITIVE_CONTROL_KIND: str = "planted"
POSITIVE_CONTROL_AGG: str = "p95"
POSITIVE_CONTROL_MIN_AUROC: float = 0.9

RULE_TEXT: str = __doc__.split("\n\n", 1)[1].strip()
"""The rule as prose, quoted by the report."""


def _below(ci) -> bool:
  """The interval ``(estimate, lo, hi)`` lies entirely below 0."""
  return ci is not None and not math.isnan(ci[2]) and ci[2] < 0


def _above(ci) -> bool:
  """The interval ``(estimate, lo, hi)`` lies entirely above 0."""
  return ci is not None and not math.isnan(ci[1]) and ci[1] > 0


def verdict(loop_diff, auroc_diff, control_ok: bool) -> str:
  """``"tail wins"``, ``"mean wins"``, ``"undecided"`` or ``"no test"``.

  Args:
    loop_diff: ``(estimate, lo, hi)`` of the matched-trait loop-rate difference, tail - mean.
    auroc_diff: ``(estimate, lo, hi)`` of the detection AUROC difference, tail - mean.
    control_ok: whether the positive control passed.
  """
  if not control_ok:
    return "no test"
  if _below(loop_diff) and _above(auroc_diff):
    return "tail wins"
  if _above(loop_diff) and _below(auroc_diff):
    return "mean wins"
  return "undecided"
