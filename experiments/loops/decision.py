"""The decision rule of the study, fixed before the full run (the report reads it from here).

Every interval is a two-sided 95% Student-t interval over seeds: each seed (one whole student per
arm, all arms of a seed sharing only common random numbers) gives one value, and the interval is
mean +- t(0.975, n - 1) * sd / sqrt(n) over the n seeds. The tail aggregate p95 is compared with
mean in two halves.

1. Closed loop at matched trait, primary condition (loops left out of self-training). The trait
   axis is the trait density: ``metrics.trait_count`` per 64 bytes (every loop collapsed to one
   copy, phrase fragments counted). The common range is where the seed-mean trait densities of
   p95's arms and of mean's arms overlap (each aggregator spans the range of its arms' seed
   means). For each seed, each aggregator's curve is the piecewise-linear line through its arms'
   (trait density, loop rate) points, extended linearly past its ends; the seed's effect is the
   mean of p95's loop rate minus mean's over 21 evenly spaced points of the common range (loop
   rate: the share of final-round held-out completions with a loop of any kind). Reading: *tail
   lower* if the interval lies entirely below 0, *mean lower* if entirely above, *undecided*
   otherwise. *Not matched* if the two ranges do not overlap, or fewer than 4 seeds are complete:
   then the closed-loop half makes no comparison (the level-by-level differences and their trait
   gaps are reported, and decide nothing).
2. Detection on low-drift checkpoints of the barrier arms (held-out loss at most 1 nat/byte above
   the base's): per checkpoint, the AUROC of real loops (any kind) against the checkpoint's clean
   trait-bearing completions, scored by each aggregate of KL(checkpoint || base); per seed, the
   mean over its checkpoints of p95's AUROC minus mean's. Reading: *tail better* if the interval
   lies entirely above 0, *mean better* if entirely below, *undecided* otherwise; *no test* if
   fewer than 4 seeds have such a checkpoint, or if the graded control fails.
   Graded control: a 2-byte unit of rare bytes, 3 copies spliced into clean trait completions,
   scored by the checkpoint moved a share g of the way toward a copy of it fine-tuned to emit the
   loop. The grade used is the one whose seed-mean AUROC for mean is nearest 0.70 (chosen on
   mean's AUROC alone); the control passes if that AUROC lies in [0.65, 0.75] and p95's AUROC
   minus mean's has its interval entirely above 0 there: the pipeline sees a tail advantage where
   one is built in.

Verdict: *tail wins* if the closed loop reads tail lower and detection tail better; *mean wins*
if the closed loop reads mean lower and detection mean better; *undecided* otherwise (one half
decided and not the other, not matched, or no test). Each half's reading is reported beside it.
"""

from __future__ import annotations

import math

TAIL_AGGS: tuple[str, ...] = ("p95",)
"""Compared, one by one, against ``"mean"`` (the aggregators of the barrier arms)."""

LEVEL: float = 0.95
"""Two-sided level of every interval."""

MIN_SEEDS: int = 4
"""Fewer seeds than this leave a half unread ("not matched" / "no test")."""

LOOP_METRIC: str = "loop_rate"
"""The closed-loop outcome: share of final-round completions with a loop of any kind."""

TRAIT_METRIC: str = "trait_density"
"""The trait axis: ``metrics.trait_count`` per 64 bytes of completion."""

DETECT_KIND: str = "any_loop"
"""The detection outcome: real loops of any kind against clean trait-bearing completions."""

DETECT_SET: str = "low_drift_barrier"
"""The checkpoints the detection half reads (``analysis.DETECT_SETS``)."""

CONTROL_TARGET: float = 0.70
CONTROL_RANGE: tuple[float, float] = (0.65, 0.75)

RULE_TEXT: str = __doc__.split("\n\n", 1)[1].strip()
"""The rule as prose, quoted by the report."""


def _below(ci) -> bool:
  """The interval ``{"lo", "hi"}`` lies entirely below 0."""
  return ci is not None and not math.isnan(ci["hi"]) and ci["hi"] < 0


def _above(ci) -> bool:
  """The interval ``{"lo", "hi"}`` lies entirely above 0."""
  return ci is not None and not math.isnan(ci["lo"]) and ci["lo"] > 0


def control_check(mean_auroc, diff) -> dict:
  """Whether the graded control passes: mean's AUROC (``{"mean", ...}``) in ``CONTROL_RANGE``
  and the tail-minus-mean interval ``diff`` above 0."""
  m = float("nan") if mean_auroc is None else mean_auroc["mean"]
  in_range = CONTROL_RANGE[0] <= m <= CONTROL_RANGE[1]
  return {"mean_auroc": m, "in_range": bool(in_range), "tail_above": _above(diff),
          "passed": bool(in_range and _above(diff))}


def closed_loop_reading(matched) -> str:
  """``"tail lower"``, ``"mean lower"``, ``"undecided"`` or ``"not matched"``."""
  if matched is None or matched.get("span") is None or matched.get("n", 0) < MIN_SEEDS:
    return "not matched"
  if _below(matched):
    return "tail lower"
  if _above(matched):
    return "mean lower"
  return "undecided"


def detection_reading(diff, control: dict) -> str:
  """``"tail better"``, ``"mean better"``, ``"undecided"`` or ``"no test"``."""
  if not control["passed"] or diff is None or diff.get("n", 0) < MIN_SEEDS:
    return "no test"
  if _above(diff):
    return "tail better"
  if _below(diff):
    return "mean better"
  return "undecided"


def verdict(closed: str, detect: str) -> str:
  """``"tail wins"``, ``"mean wins"`` or ``"undecided"`` from the two halves' readings."""
  if closed == "tail lower" and detect == "tail better":
    return "tail wins"
  if closed == "mean lower" and detect == "mean better":
    return "mean wins"
  return "undecided"
