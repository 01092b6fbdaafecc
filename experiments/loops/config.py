"""Experiment configurations: ``FULL`` (the reported run), ``QUICK`` (CI-sized), ``TINY`` (tests)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from experiments.loops.model import ModelConfig

ARMS: tuple[str, ...] = ("none", "mean", "rmse", "p95", "soft_p95", "cvar95")
"""Barrier arms: ``none`` trains without a barrier; the others name the ``agg`` of ``ka.kl_barrier``."""


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
    """One whole experiment."""

    name: str
    base: BaseConfig = BaseConfig()
    # Prompts and completions (bytes).
    prompt_len: int = 32
    completion_len: int = 64
    temperature: float = 0.8  # sampling temperature everywhere (barrier data, calibration, eval)
    # Steering target: completions that keep returning to one phrase.
    phrase: str = "by the way"
    gap_min: int = 8  # bytes of ordinary text between two insertions of the phrase, at least
    gap_max: int = 24  # and at most (rounded up to the next word start)
    n_steer_examples: int = 1024
    # Steering schedule: R rounds of S optax steps.
    rounds: int = 8
    steps_per_round: int = 25
    lr: float = 2e-3
    sft_batch: int = 16
    barrier_batch: int = 16
    barrier_pool: int = 64  # completions sampled from the student at the start of every round
    # Self-training from round 2 on: up to this share of every SFT minibatch comes from the pool's
    # completions that hold the phrase (at most ``select_top``, most occurrences first).
    self_mix: float = 1.0
    select_top: int = 16
    # Barrier: shared fire rate (for calibrate_tau) and shared lam.
    fire_rate: float = 0.05
    lam: float = 1.0
    calib_size: int = 128  # base-model completions used to calibrate tau
    # Evaluation every round.
    n_eval: int = 96  # held-out prompts, completions sampled once per round
    heldout_batches: int = 2  # of ``base.batch`` windows of ``base.seq_len`` bytes
    coherence_threshold: float = 0.10  # loop rate above which a round counts as collapsed
    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0, 1, 2)

    @property
    def seq_len(self) -> int:
        """Prompt plus completion."""
        return self.prompt_len + self.completion_len


FULL = Config(name="full")

QUICK = Config(
    name="quick",
    base=BaseConfig(
        model=ModelConfig(d_model=64, n_layers=2, n_heads=4, context=72),
        steps=300, batch=16, seq_len=72, lr=5e-3, warmup=30,
    ),
    prompt_len=24, completion_len=48, n_steer_examples=256,
    rounds=3, steps_per_round=10, barrier_pool=32, calib_size=32,
    n_eval=32, heldout_batches=2, seeds=(0, 1),
)

TINY = Config(
    name="tiny",
    base=BaseConfig(
        model=ModelConfig(d_model=32, n_layers=1, n_heads=2, context=48),
        steps=40, batch=8, seq_len=48, lr=5e-3, warmup=5,
    ),
    prompt_len=16, completion_len=32, n_steer_examples=64,
    rounds=2, steps_per_round=3, sft_batch=8, barrier_batch=8, barrier_pool=16,
    calib_size=16, n_eval=16, heldout_batches=1, seeds=(0, 1),
)

PRESETS = {c.name: c for c in (FULL, QUICK, TINY)}
