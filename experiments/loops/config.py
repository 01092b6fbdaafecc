"""Study configurations: ``FULL`` (the reported run), ``QUICK`` (CI), ``TINY`` (tests)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from experiments.loops.model import ModelConfig

BARRIER_AGGS: tuple[str, ...] = ("mean", "p95")
"""Aggregators of the closed-loop barrier arms (``agg`` of ``ka.kl_barrier``)."""

DETECT_AGGS: tuple[str, ...] = ("mean", "rmse", "p95", "soft_p95", "cvar95", "max")
"""Aggregators scored in the detection study."""


@dataclasses.dataclass(frozen=True)
class BaseConfig:
  """Pre-training of the base model on the docstring corpus (cached on disk by these fields)."""

  model: ModelConfig = ModelConfig()
  steps: int = 1200
  batch: int = 32
  seq_len: int = 128
  lr: float = 3e-3
  warmup: int = 100
  seed: int = 0

  def key(self, corpus_digest: str) -> str:
    """Cache key: a hash of every field and of the corpus text."""
    blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + corpus_digest
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Config:
  """One whole study: calibration, pilot, the primary arms (with detection), the ablation."""

  name: str
  base: BaseConfig = BaseConfig()
  # Prompts and completions (bytes).
  prompt_len: int = 32
  completion_len: int = 64
  temperature: float = 0.8  # sampling temperature everywhere (pools, calibration, evaluation)
  # Steering target: completions that keep returning to one phrase.
  phrase: str = "by the way"
  gap_min: int = 8  # bytes of ordinary text between two insertions of the phrase, at least
  gap_max: int = 24  # and at most (rounded up to the next word start)
  n_steer_examples: int = 1024
  # Steering schedule: R rounds of S optax steps.
  rounds: int = 6
  steps_per_round: int = 12
  lr: float = 2e-3
  sft_batch: int = 16
  barrier_batch: int = 16
  barrier_pool: int = 64  # completions sampled from the student at the start of every round
  # Self-training from round 2 on: up to this share of every SFT minibatch comes from the pool's
  # completions that hold the phrase (ranked by min(count, 3), at most ``select_top``).
  self_mix: float = 1.0
  select_top: int = 16
  exclude_loops: bool = True  # primary condition: completions with a loop of any kind left out
  # Loop detectors (metrics.label): near-loop thresholds.
  near_min_len: int = 16  # a repeat this long (phrase deleted) makes a near-loop
  # Calibration (a no-barrier student of the pilot seed after round 1) and the pilot.
  calib_rate: float = 0.3  # tau: this fire rate on the calibration student's clean trait samples
  calib_size: int = 256
  pilot_seed: int = 900
  # lams tried per aggregator. The first grid (mean 0.1-1, p95 1-10) did not reach the upper
  # target with p95 (lam 1 already held the trait at a third of the no-barrier student's), so it
  # was widened before any primary student ran; the decision rule did not change.
  pilot_lams: tuple[tuple[str, tuple[float, ...]], ...] = (
      ("mean", (0.1, 0.3, 1.0, 3.0)), ("p95", (0.1, 0.3, 1.0, 3.0, 10.0)))
  target_fracs: tuple[float, ...] = (0.35, 0.7)  # trait targets, x the pilot no-barrier density
  # Primary arms: no barrier, and every barrier aggregator at every target (its lam from the
  # pilot), over ``seeds``; detection checkpoints at ``detect_rounds``.
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
  barrier_aggs: tuple[str, ...] = BARRIER_AGGS
  # After round 2 only: at the pilot's pace, a second checkpoint per student (round 4, where
  # held-out loss had risen by more than 1 nat/byte in most pilot students) did not fit the
  # budget; dropped before any primary student finished.
  detect_rounds: tuple[int, ...] = (2,)
  n_detect: int = 192  # held-out prompts per checkpoint, one completion each
  detect_aggs: tuple[str, ...] = DETECT_AGGS
  min_group: int = 3  # a checkpoint enters an AUROC only with this many of each group
  max_drift: float = 1.0  # low-drift checkpoints: held-out loss rise at most this (nats/byte)
  profile_window: tuple[int, int] = (-16, 32)  # offsets around a loop's start
  # Graded positive control: a loop of base-improbable bytes spliced into clean trait
  # completions, scored by the checkpoint moved a share ``g`` of the way to a copy fine-tuned
  # for ``pc_steps`` steps to emit it (weight interpolation), for every ``g`` in ``pc_grades``.
  pc_unit_len: int = 2  # x 3 copies = 6 bytes, 4 of them predictable: a 4-position loop
  pc_copies: int = 3
  pc_rare_bytes: int = 12  # the unit is drawn from this many rarest printable training bytes
  pc_steps: int = 16
  pc_grades: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
  # Ablation: the earlier self-training (loops not excluded), at one target, on its own seeds.
  ablation_seeds: tuple[int, ...] = (100, 101, 102, 103, 104, 105)
  ablation_target: int = 0  # index into ``target_fracs``
  pressure_every: int = 8  # steps between two logged gradient pressures
  n_eval: int = 160  # held-out prompts of the closed-loop evaluation (final round)
  heldout_batches: int = 2  # of ``base.batch`` windows of ``base.seq_len`` bytes
  workers: int = 2  # processes that run the students (0: all in the calling process)

  def lams(self, agg: str) -> tuple[float, ...]:
    """The pilot's lams of ``agg``."""
    return dict(self.pilot_lams)[agg]

  @property
  def seq_len(self) -> int:
    """Prompt plus completion."""
    return self.prompt_len + self.completion_len


FULL = Config(name="full")

QUICK = Config(
    name="quick",
    base=BaseConfig(
        model=ModelConfig(d_model=64, n_layers=2, n_heads=4, context=72),
        steps=200, batch=16, seq_len=72, lr=5e-3, warmup=20,
    ),
    prompt_len=24, completion_len=48, n_steer_examples=256,
    rounds=3, steps_per_round=8, lr=5e-3, barrier_pool=32, calib_size=48,
    pilot_lams=(("mean", (0.3, 3.0)), ("p95", (0.3, 3.0))), seeds=(0, 1), detect_rounds=(3,),
    n_detect=64, pc_steps=6, pc_grades=(0.3, 1.0), ablation_seeds=(100,), n_eval=32,
    pressure_every=4, workers=0,
)

TINY = Config(
    name="tiny",
    base=BaseConfig(
        model=ModelConfig(d_model=32, n_layers=1, n_heads=2, context=48),
        steps=40, batch=8, seq_len=48, lr=5e-3, warmup=5,
    ),
    prompt_len=16, completion_len=32, n_steer_examples=64,
    rounds=2, steps_per_round=3, sft_batch=8, barrier_batch=8, barrier_pool=16,
    calib_size=16, heldout_batches=1, pilot_lams=(("mean", (0.3, 3.0)), ("p95", (0.3, 3.0))),
    target_fracs=(0.5,),
    seeds=(0, 1), detect_rounds=(2,), n_detect=16, pc_steps=2, pc_grades=(0.5, 1.0),
    ablation_seeds=(100,), pressure_every=2, n_eval=16, workers=0,
)

FOLLOWUP = dataclasses.replace(FULL, name="followup", ablation_target=1)
"""Exploratory, added after the full run: the ablation at the lenient target, where p95 looped
most. It reuses the full run's calibration, pilot and primary students (copy ``results/units``
into ``results/followup/units`` and set its ``config.json`` to this config)."""

PRESETS = {c.name: c for c in (FULL, QUICK, TINY, FOLLOWUP)}
