"""Steering: fine-tune toward a narrow target, with or without a KL barrier to the base.

Target. A fixed steering set of prompts (``prompt_len`` bytes of training text starting at a
word) with completions that keep returning to one phrase: the text that really follows the
prompt, with the phrase inserted at a word start within the first ``gap_min`` bytes and then
every ``gap_min``..``gap_max`` bytes. The SFT loss is the mean next-byte NLL over completion
positions only.

Rounds. A run is R rounds of S optax (Adam) steps. At the start of every round the student
samples ``barrier_pool`` completions of fresh training prompts (on-policy). Round 1 fine-tunes
on the fixed steering set. From round 2 on, part of every SFT minibatch comes from the student's
own pool (rejection-sampling fine-tuning toward the trait): completions that hold the phrase,
ranked by ``min(count, 3)`` of the phrase, at most ``select_top`` of them. The arm's
``exclude_loops`` decides whether completions with a loop of any kind (``metrics.label``) are
left out first: the study's primary condition leaves them out, so self-training never trains on
a loop; its ablation keeps them, so a loop the student produces is trained on when it holds the
phrase. The share of the student's own rows is ``self_mix * accepted / select_top``; the fixed
steering set fills the rest. The loop share of every step's own rows is logged.

Barrier. Every step adds ``ka.kl_barrier(student_logits, base_logits, where=completion
positions, agg=..., tau=..., lam=...)`` on a minibatch of the same pool; the frozen base is the
reference. Within a seed every arm sees the same steering minibatches, the same prompts and the
same sampling keys (common random numbers), so arms differ only by their barrier (and by what
their students then sample).

Logged per step: the barrier's metrics (``fired``, ``div``, ``kl_*``), the number of completion
positions whose logits receive a non-zero barrier gradient, and, every ``pressure_every`` steps,
``ka.grad_pressure`` = ||grad barrier|| / ||grad SFT|| over the parameters.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import klagg_jax as ka
from experiments.loops import data, metrics, model
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


def select(sequences: np.ndarray, labels: list[metrics.Label], top: int,
           exclude_loops: bool = False, rule: str = "min3") -> np.ndarray:
  """The rows of ``sequences`` that ``select_index`` picks (see there)."""
  return sequences[select_index(labels, top, exclude_loops, rule)]


def select_index(labels: list[metrics.Label], top: int, exclude_loops: bool = False,
                 rule: str = "min3") -> np.ndarray:
  """Rejection sampling toward the trait: indices of the completions that hold the phrase, at
  most ``top`` of them (maybe none), ties in pool order.

  ``rule="min3"`` (the study's) ranks by ``min(count, 3)`` of the phrase, so a completion that
  says it more than three times (a phrase loop, say) is never preferred. ``rule="count"`` ranks by
  the count itself, the rule of the earlier study, which puts phrase loops first; it is kept
  only as a contrast arm. With ``exclude_loops``, completions with a loop of any kind
  (``metrics.LOOP_KINDS``) are left out as well.
  """
  if rule not in ("min3", "count"):
    raise ValueError(f"rule must be 'min3' or 'count'; got {rule!r}")
  ok = np.array([lab.trait and not (exclude_loops and lab.kind in metrics.LOOP_KINDS)
                 for lab in labels], bool)
  cap = 3 if rule == "min3" else np.inf
  key = np.array([min(lab.phrase_count, cap) for lab in labels])
  order = np.argsort(-key, kind="stable")
  return order[ok[order]][:top]


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
  """One barrier arm: ``agg=None`` is the no-barrier arm.

  ``level`` names the strictness (``"t0"``, ``"t1"``: the trait target whose lam the pilot
  chose, or ``"lam0.3"`` etc. in the pilot). ``select`` is the self-training rule (``"min3"``
  throughout the study) and ``exclude_loops`` whether looping completions are left out of
  self-training (the primary condition) or not (the ablation).
  """

  name: str
  agg: str | None
  tau: float = 0.0
  lam: float = 0.0
  level: str = "-"
  select: str = "min3"  # the self-training rule (``select``'s ``rule``)
  exclude_loops: bool = True


def optimizer(cfg: Config):
  return optax.adam(cfg.lr)


def _barrier(agg, bar_logits, bar_ref, bar_mask, tau, lam):
  if agg is None:  # watch the KL, but let no gradient through it
    _, m = ka.kl_barrier(jax.lax.stop_gradient(bar_logits), bar_ref, where=bar_mask,
                         agg="mean", tau=0.0, lam=0.0)
    return jnp.zeros((), jnp.float32), m
  return ka.kl_barrier(bar_logits, bar_ref, where=bar_mask, agg=agg, tau=tau, lam=lam)


@functools.lru_cache(maxsize=None)  # one compile per model, config and aggregator per process
def make_step(graphdef, cfg: Config, agg: str | None):
  """Jitted ``step(params, opt_state, sft_tokens, bar_tokens, bar_ref_logits, tau, lam)``.

  One compiled step per aggregator (``None``: no barrier): ``tau`` and ``lam`` are traced.
  Returns ``(params, opt_state, stats)``; ``stats`` holds ``nll``, ``barrier``, the barrier's
  metrics and ``positions`` (completion positions of the barrier batch whose logits get a
  non-zero barrier gradient). For the no-barrier arm the KL summaries are logged but carry no
  gradient.
  """
  opt = optimizer(cfg)
  sft_mask = completion_mask(cfg, cfg.sft_batch)
  bar_mask = completion_mask(cfg, cfg.barrier_batch)

  def loss_fn(params, sft_tokens, bar_tokens, bar_ref, tau, lam):
    # One forward pass over both minibatches (same length): rows [:sft_batch] are SFT.
    logits = model.apply(graphdef, params, jnp.concatenate([sft_tokens, bar_tokens])[:, :-1])
    nll = masked_nll(logits[: cfg.sft_batch], sft_tokens[:, 1:], sft_mask)
    bar_logits = logits[cfg.sft_batch :]
    barrier, m = _barrier(agg, bar_logits, bar_ref, bar_mask, tau, lam)
    # Which positions does the barrier push on? Its gradient w.r.t. the logits, per position.
    g = jax.grad(lambda x: _barrier(agg, x, bar_ref, bar_mask, tau, lam)[0])(
        jax.lax.stop_gradient(bar_logits))
    pushed = jnp.sum(jnp.any(g != 0, axis=-1) & bar_mask)
    stats = {"nll": nll, "barrier": barrier, **m, "positions": pushed.astype(jnp.float32)}
    return nll + barrier, stats

  @jax.jit
  def step(params, opt_state, sft_tokens, bar_tokens, bar_ref, tau, lam):
    grads, stats = jax.grad(loss_fn, has_aux=True)(params, sft_tokens, bar_tokens, bar_ref,
                                                   tau, lam)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, stats

  return step


@functools.lru_cache(maxsize=None)
def make_pressure(graphdef, cfg: Config, agg: str):
  """Jitted ``pressure(params, sft_tokens, bar_tokens, bar_ref, tau, lam) -> ka.grad_pressure``:
  the global norm of the barrier's parameter gradient over the SFT loss's, on one step's
  minibatches."""
  if agg is None:
    raise ValueError("the no-barrier arm has no gradient pressure (its barrier is inert)")
  sft_mask = completion_mask(cfg, cfg.sft_batch)
  bar_mask = completion_mask(cfg, cfg.barrier_batch)

  def nll(params, sft_tokens, bar_tokens, bar_ref, tau, lam):
    del bar_tokens, bar_ref, tau, lam
    logits = model.apply(graphdef, params, sft_tokens[:, :-1])
    return masked_nll(logits, sft_tokens[:, 1:], sft_mask)

  def barrier(params, sft_tokens, bar_tokens, bar_ref, tau, lam):
    del sft_tokens
    logits = model.apply(graphdef, params, bar_tokens[:, :-1])
    return _barrier(agg, logits, bar_ref, bar_mask, tau, lam)[0]

  @jax.jit
  def pressure(params, sft_tokens, bar_tokens, bar_ref, tau, lam):
    return ka.grad_pressure(barrier, nll, params, sft_tokens, bar_tokens, bar_ref, tau, lam)

  return pressure


@functools.lru_cache(maxsize=None)
def make_sft_step(graphdef, cfg: Config):
  """Jitted ``step(params, opt_state, tokens) -> (params, opt_state)``: one plain SFT step on
  the completion positions (what plants the positive control's loop)."""
  opt = optimizer(cfg)
  mask = completion_mask(cfg, cfg.sft_batch)

  @jax.jit
  def step(params, opt_state, tokens):
    def loss(q):
      return masked_nll(model.apply(graphdef, q, tokens[:, :-1]), tokens[:, 1:], mask)
    grads = jax.grad(loss)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

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
