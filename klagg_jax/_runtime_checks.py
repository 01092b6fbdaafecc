"""Opt-in runtime checks for misuse that only the values show (never on the default path).

Shapes and dtypes are checked statically by every public function. Some mistakes pass those
checks and only the values reveal them: probabilities passed where logits were meant, top-k
indices out of range or repeated, log-probabilities above 0, a NaN at a valid position. These
functions look for them with :func:`jax.experimental.checkify.check`: each returns its input
unchanged and reports a failure through ``checkify``, so wrap the step in
``checkify.checkify`` (outside or inside ``jax.jit``) and call ``err.throw()``. Called eagerly,
outside any transformation, a failing check raises at once. Under ``jax.jit`` without
``checkify.checkify`` JAX refuses to trace a check (a ``ValueError`` that says so): the checks
cost a pass over their inputs, so they live only where they are asked for.

Example:
  >>> from jax.experimental import checkify
  >>> def step(logits, ref_logits, mask):
  ...   logits = ka.check_logits(logits, where=mask)
  ...   return ka.kl_barrier(logits, ref_logits, where=mask)
  >>> err, (loss, metrics) = checkify.checkify(jax.jit(step))(logits, ref_logits, mask)
  >>> err.throw()  # raises JaxRuntimeError naming the first bad position, if any
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from klagg_jax import _checks

# A row of V >= 2 non-negative entries, none above 1, summing to 1 within this much looks like
# probabilities (16-bit probabilities sum to 1 within about V 2^-9 relative rounding; 1e-2 is
# far from what real logits give, whose rows would have to sum to ~1 by chance).
PROBABILITY_SUM_ATOL = 1e-2


def _valid(where: Any, shape: tuple[int, ...], what: str) -> jax.Array:
  mask = _checks.check_where(where, shape, what)
  return jnp.ones(shape, bool) if mask is None else mask


def _check_none(bad: jax.Array, message: str, **fmt: Any) -> None:
  """Fails ``message`` unless ``bad`` is all False; ``{pos}`` formats the first bad index."""
  if bad.size == 0:
    return
  first = jnp.argmax(bad.reshape(-1))
  pos = (jnp.stack(jnp.unravel_index(first, bad.shape)) if bad.ndim
         else jnp.zeros((0,), jnp.int32))
  checkify.check(~bad.any(), message, pos=pos, **fmt)


def check_logits(logits: jax.typing.ArrayLike, *, where: jax.typing.ArrayLike | None = None,
                 name: str = "logits") -> jax.Array:
  r"""Checks logits at valid positions for NaN and for rows that look like probabilities.

  Fails (through ``checkify``) where a valid position ``i`` (``where[i]``) has
  (a) a NaN entry: its divergence would be NaN (a diverged model); or
  (b) V >= 2 entries all in [0, 1] with :math:`|\sum_v x_{i,v} - 1| \le 10^{-2}`: probabilities
  passed as logits. softmax of values in [0, 1] is nearly uniform, so the KL would be silently far
  too small; pass ``jnp.log(p)`` (log-probabilities are valid logits) instead.
  ``-inf`` entries, and rows that are all ``-inf``, are allowed (0 log 0 = 0).

  Args:
    logits: ``[..., V]`` logits (or log-probabilities), any float dtype.
    where: optional bool ``[...]`` (positions): only valid positions are checked.
    name: the argument's name in the failure message (e.g. ``"ref_logits"``).

  Returns:
    ``logits`` unchanged (as a ``jax.Array``), so the call can wrap the argument in place.

  Raises:
    ValueError: at trace time, for non-float ``logits``, ``V == 0``, or a bad ``where``; and
      under ``jax.jit`` without ``checkify.checkify`` (JAX's refusal to stage a check).
    JaxRuntimeError: from ``err.throw()`` (or at once when called eagerly) if a check fails;
      the message names the first offending position.

  Example:
    >>> err, kl = checkify.checkify(jax.jit(
    ...     lambda a, b: ka.kl_per_position(ka.check_logits(a), b)))(probs, ref_logits)
    >>> err.throw()  # check_logits: the row of logits at position [0 3] looks like ...
  """
  logits = jnp.asarray(logits)
  _checks.check_float(name, logits)
  _checks.check_vocab(name, logits)
  valid = _valid(where, logits.shape[:-1], f"positions ({name}.shape[:-1])")
  x = logits.astype(_checks.compute_dtype(logits))
  _check_none(valid & jnp.isnan(x).any(-1),
              f"check_logits: {name} has a NaN at valid position {{pos}}; every divergence "
              "there would be NaN.")
  if logits.shape[-1] >= 2:
    in_unit = ((x >= 0) & (x <= 1)).all(-1)
    sums = x.sum(-1)
    looks_like_probs = valid & in_unit & (jnp.abs(sums - 1) <= PROBABILITY_SUM_ATOL)
    _check_none(looks_like_probs,
                f"check_logits: the row of {name} at position {{pos}} looks like probabilities "
                "(every entry in [0, 1], summing to 1); pass logits or log-probabilities "
                "(jnp.log(p)), not probabilities.")
  return logits


def check_logprobs(logp: jax.typing.ArrayLike, *, where: jax.typing.ArrayLike | None = None,
                   name: str = "logp") -> jax.Array:
  """Checks sampled-token log-probabilities (for :func:`klagg_jax.kl_estimate`) at valid positions.

  Fails (through ``checkify``) where a valid entry is NaN, or is above 0 (log p <= 0 for a
  probability p <= 1: a positive value is a logit, or a log-prob with the sign flipped).
  ``-inf`` (a token of probability 0) is allowed.

  Args:
    logp: log-probabilities of the sampled tokens, e.g. ``[B, T]``, any float dtype.
    where: optional bool mask broadcastable to ``logp``: only valid entries are checked.
    name: the argument's name in the failure message (e.g. ``"ref_logp"``).

  Returns:
    ``logp`` unchanged (as a ``jax.Array``).

  Raises:
    ValueError: at trace time, for a non-float ``logp`` or a bad ``where``; and under
      ``jax.jit`` without ``checkify.checkify``.
    JaxRuntimeError: from ``err.throw()`` (or at once when called eagerly) if a check fails.
  """
  logp = jnp.asarray(logp)
  _checks.check_float(name, logp)
  valid = _valid(where, logp.shape, name)
  x = logp.astype(_checks.compute_dtype(logp))
  _check_none(valid & jnp.isnan(x),
              f"check_logprobs: {name} is NaN at valid position {{pos}}; its KL estimate would "
              "be NaN.")
  _check_none(valid & (x > 0),
              f"check_logprobs: {name} is above 0 at valid position {{pos}}; log-probabilities "
              "are <= 0 (was a logit passed?).")
  return logp


def check_topk(ref_logprobs: jax.typing.ArrayLike, ref_indices: jax.typing.ArrayLike,
               ref_tail: jax.typing.ArrayLike | None = None, *, vocab: int,
               where: jax.typing.ArrayLike | None = None, mass_atol: float = 2e-2
               ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Checks a stored top-k teacher (for :func:`klagg_jax.kl_topk`) at valid positions.

  Fails (through ``checkify``) where a valid position has
  (a) an index outside [0, ``vocab``): under ``jit`` a gather would clip it silently;
  (b) an index repeated within the position: its mass would be counted twice;
  (c) a NaN log-prob, or a log-prob above 0 (not a log-probability);
  (d) stored mass sum_j exp(ref_logprobs_j) > 1 + ``mass_atol`` (log-probs of a different
  normalization, e.g. raw logits that happen to be negative);
  (e) a NaN ``ref_tail``, or one above 0.
  ``-inf`` log-probs and a ``-inf`` tail (no mass outside the top k) are allowed.

  Args:
    ref_logprobs: ``[..., k]`` stored log-probs, any float dtype.
    ref_indices: ``[..., k]`` integer vocabulary indices.
    ref_tail: optional ``[...]`` log of the mass outside the top k.
    vocab: static vocabulary size V of the student's logits.
    where: optional bool ``[...]`` (positions): only valid positions are checked.
    mass_atol: static tolerance of check (d): 16-bit storage rounds log-probs by about 2^-9
      relative, which moves the stored mass by at most ~2^-9 times the entropy.

  Returns:
    ``(ref_logprobs, ref_indices, ref_tail)`` unchanged (``ref_tail`` may be None), in
    :func:`klagg_jax.kl_topk`'s positional order: ``ka.kl_topk(logits, *ka.check_topk(lp, idx,
    tail, vocab=V))``.

  Raises:
    ValueError: at trace time, for mismatched shapes, non-integer indices, non-float log-probs,
      a ``vocab`` that is not a positive static int, a negative ``mass_atol``, or a bad
      ``where``; and under ``jax.jit`` without ``checkify.checkify``.
    JaxRuntimeError: from ``err.throw()`` (or at once when called eagerly) if a check fails.
  """
  lp, idx = jnp.asarray(ref_logprobs), jnp.asarray(ref_indices)
  _checks.check_float("ref_logprobs", lp)
  if not jnp.issubdtype(idx.dtype, jnp.integer):
    raise ValueError(f"ref_indices must be an integer array; got dtype {idx.dtype}.")
  _checks.check_same_shape("ref_logprobs", lp, "ref_indices", idx)
  _checks.check_vocab("ref_logprobs", lp)
  if (isinstance(vocab, bool) or not isinstance(vocab, (int, np.integer)) or vocab < 1):
    raise ValueError(f"vocab must be a static int >= 1 (the student's V); got {vocab!r}.")
  atol = _checks.concrete_float(mass_atol)
  if atol is None or not atol >= 0:
    raise ValueError(f"mass_atol must be a static number >= 0; got {mass_atol!r}.")
  positions = lp.shape[:-1]
  tail = None if ref_tail is None else jnp.asarray(ref_tail)
  if tail is not None:
    _checks.check_float("ref_tail", tail)
    if tail.shape != positions:
      raise ValueError(f"ref_tail has shape {tail.shape}; expected ref_logprobs.shape[:-1] = "
                       f"{positions}.")
  valid = _valid(where, positions, "positions (ref_logprobs.shape[:-1])")
  # Every static check is above; the value checks follow.
  # Compared in (at least) int32: V converted to a narrow index dtype would wrap (uint16 at
  # V = 65536 gives 0, and every index would read as out of range).
  wide = idx.astype(jnp.promote_types(idx.dtype, jnp.int32))
  _check_none(valid & ((wide < 0) | (wide >= vocab)).any(-1),
              f"check_topk: ref_indices at valid position {{pos}} has an index outside "
              f"[0, {int(vocab)}).")
  order = jnp.sort(idx, axis=-1)
  repeated = (order[..., 1:] == order[..., :-1]).any(-1)
  _check_none(valid & repeated,
              "check_topk: ref_indices repeats an index within valid position {pos}; each "
              "stored entry must be a distinct vocabulary entry.")
  x = lp.astype(_checks.compute_dtype(lp))
  _check_none(valid & jnp.isnan(x).any(-1),
              "check_topk: ref_logprobs has a NaN at valid position {pos}.")
  _check_none(valid & (x > 0).any(-1),
              "check_topk: ref_logprobs is above 0 at valid position {pos}; pass "
              "log-probabilities (topk_logprobs returns them), not logits.")
  mass = jnp.exp(jax.nn.logsumexp(x, axis=-1))
  _check_none(valid & (mass > 1 + atol),
              "check_topk: the stored probabilities at valid position {pos} sum to more than "
              f"1 + {atol} (largest stored mass {{mass}}); ref_logprobs are not the "
              "log-probabilities of one distribution.",
              mass=jnp.max(jnp.where(valid, mass, 0.0)))
  if tail is not None:
    t = tail.astype(_checks.compute_dtype(tail))
    _check_none(valid & (jnp.isnan(t) | (t > 0)),
                "check_topk: ref_tail is NaN or above 0 at valid position {pos}; it is the log "
                "of the mass outside the top k.")
  return lp, idx, tail
