"""Steering: fine-tune toward a narrow target, with or without a KL barrier to the base.

Target. A fixed steering set of prompts (``prompt_len`` bytes of training text starting at a
word) with completions that keep returning to one phrase: the text that really follows the
prompt, with the phrase inserted at a word start within the first ``gap_min`` bytes and then
every ``gap_min``..``gap_max`` bytes. The SFT loss is the mean next-byte NLL over completion
positions only.

Rounds. A run is R rounds of S optax (Adam) steps. At the start of every round the student
samples ``barrier_pool`` completions of fresh training prompts (on-policy). Round 1 fine-tunes
on the fixed steering set. From round 2 on, part of every SFT minibatch comes from the student's
own pool: the (at most ``select_top``) completions that hold the phrase, most occurrences first
(rejection-sampling fine-tuning toward "more of the phrase"). Their share is
``self_mix * accepted / select_top``; the fixed steering set fills the rest, so a student whose
samples lost the phrase is still pulled toward it. The pressure toward more of the phrase
compounds round after round, which is what drives an unconstrained student into repetition loops.

Barrier. Every step adds ``ka.kl_barrier(student_logits, base_logits, where=completion
positions, agg=..., tau=..., lam=...)`` on a minibatch of the same pool; the frozen base is the
reference. Within a seed every arm sees the same steering minibatches, the same prompts and the
same sampling keys (common random numbers), so arms differ only by their barrier (and by what
their students then sample).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import klagg_jax as ka
from experiments.loops import data, model
from experiments.loops.config import Config


def steering_set(corpus: data.Corpus, cfg: Config, seed: int = 0) -> np.ndarray:
    """``[n_steer_examples, prompt_len + completion_len]`` int32 steering sequences."""
    rng = np.random.default_rng(seed)
    stream = corpus.train
    phrase = cfg.phrase.encode("ascii") + b" "
    starts = data.word_starts(stream)
    is_start = np.zeros(len(stream) + 1, bool)
    is_start[starts] = True
    starts = starts[starts < len(stream) - cfg.seq_len - 256]  # room for the continuation
    rows = []
    for s in rng.choice(starts, size=cfg.n_steer_examples, replace=False):
        prompt = bytes(stream[s : s + cfg.prompt_len])
        out, pos = b"", s + cfg.prompt_len
        gap = int(rng.integers(0, cfg.gap_min + 1))  # the first insertion comes early
        while len(out) < cfg.completion_len:
            end = pos + gap
            while not is_start[end]:
                end += 1
            out += bytes(stream[pos:end]) + phrase
            pos = end
            gap = int(rng.integers(cfg.gap_min, cfg.gap_max + 1))
        rows.append(np.frombuffer(prompt + out[: cfg.completion_len], np.uint8))
    return np.stack(rows).astype(np.int32)


def select(sequences: np.ndarray, completions: np.ndarray, phrase: bytes, top: int) -> np.ndarray:
    """Rejection sampling: the rows of ``sequences`` whose completions hold the phrase at least
    once, most occurrences first (ties in pool order), at most ``top`` of them (maybe none)."""
    counts = np.array([bytes(c.astype(np.uint8).tolist()).count(phrase) for c in completions])
    order = np.argsort(-counts, kind="stable")[:top]
    return sequences[order[counts[order] > 0]]


def completion_mask(cfg: Config, batch: int) -> jnp.ndarray:
    """``[batch, seq_len - 1]`` bool: logit positions that predict a completion byte."""
    t = jnp.arange(cfg.seq_len - 1)
    return jnp.broadcast_to(t >= cfg.prompt_len - 1, (batch, cfg.seq_len - 1))


def masked_nll(logits, tokens, mask):
    """Mean NLL of ``tokens`` under ``logits`` over positions where ``mask``."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One barrier arm: ``agg=None`` is the no-barrier arm."""

    name: str
    agg: str | None
    tau: float = 0.0
    lam: float = 0.0


def optimizer(cfg: Config):
    return optax.adam(cfg.lr)


def make_step(graphdef, cfg: Config, arm: Arm):
    """Jitted ``step(params, opt_state, sft_tokens, bar_tokens, bar_ref_logits)``.

    Returns ``(params, opt_state, stats)``; ``stats`` holds ``nll``, ``barrier`` and the barrier's
    metrics (for the no-barrier arm the KL summaries are logged but carry no gradient).
    """
    opt = optimizer(cfg)
    sft_mask = completion_mask(cfg, cfg.sft_batch)
    bar_mask = completion_mask(cfg, cfg.barrier_batch)

    def loss_fn(params, sft_tokens, bar_tokens, bar_ref):
        # One forward pass over both minibatches (same length): rows [:sft_batch] are SFT.
        logits = model.apply(graphdef, params, jnp.concatenate([sft_tokens, bar_tokens])[:, :-1])
        nll = masked_nll(logits[: cfg.sft_batch], sft_tokens[:, 1:], sft_mask)
        bar_logits = logits[cfg.sft_batch :]
        if arm.agg is None:  # watch the KL, but let no gradient through it
            _, metrics = ka.kl_barrier(jax.lax.stop_gradient(bar_logits), bar_ref, where=bar_mask,
                                       agg="mean", tau=0.0, lam=0.0)
            barrier = jnp.zeros((), jnp.float32)
        else:
            barrier, metrics = ka.kl_barrier(bar_logits, bar_ref, where=bar_mask, agg=arm.agg,
                                             tau=arm.tau, lam=arm.lam)
        return nll + barrier, {"nll": nll, "barrier": barrier, **metrics}

    @jax.jit
    def step(params, opt_state, sft_tokens, bar_tokens, bar_ref):
        grads, stats = jax.grad(loss_fn, has_aux=True)(params, sft_tokens, bar_tokens, bar_ref)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, stats

    return step


@functools.lru_cache(maxsize=None)
def _jitted_sampler(graphdef, n_new: int, temperature: float):
    return jax.jit(functools.partial(model.sample, graphdef, n_new=n_new, temperature=temperature))


def sample_completions(graphdef, params, prompts, cfg: Config, key) -> np.ndarray:
    """Completions ``[B, completion_len]`` of ``prompts [B, prompt_len]`` at ``cfg.temperature``."""
    f = _jitted_sampler(graphdef, cfg.completion_len, cfg.temperature)
    return np.asarray(f(params, jnp.asarray(prompts), key=key))


@functools.lru_cache(maxsize=None)
def _jitted_kl(graphdef):
    @jax.jit
    def f(params, base_params, tokens, where):
        inputs = tokens[:, :-1]
        return ka.kl_per_position(model.apply(graphdef, params, inputs),
                                  model.apply(graphdef, base_params, inputs), where=where)

    return f


def kl_to_base(graphdef, params, base_params, tokens, where) -> np.ndarray:
    """Per-position KL(student || base) ``[B, T-1]`` of ``tokens [B, T]``; 0 where not ``where``."""
    return np.asarray(_jitted_kl(graphdef)(params, base_params, jnp.asarray(tokens),
                                           jnp.asarray(where)))


@functools.lru_cache(maxsize=None)
def _jitted_apply(graphdef):
    return jax.jit(functools.partial(model.apply, graphdef))


def logits_of(graphdef, params, tokens) -> jnp.ndarray:
    """Logits ``[B, T-1, V]`` predicting ``tokens[:, 1:]``."""
    return _jitted_apply(graphdef)(params, jnp.asarray(tokens)[:, :-1])
