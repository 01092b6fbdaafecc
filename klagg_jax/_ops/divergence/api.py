"""The per-position divergence's public entry points: validation, transform, dispatch.

The implementations share one contract, ``rows(a, b, mask, spec) -> [N]`` on ``[N, V]`` logits
in their own dtype with the transform of ``spec`` still to apply; :data:`IMPLEMENTATIONS` names
them for :mod:`klagg_jax._ops.registry`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from klagg_jax import _checks, _sharding
from klagg_jax._chunked import chunking
from klagg_jax._ops import compiled, registry, transform
from klagg_jax._ops.divergence import chunked, pallas, xla
from klagg_jax._ops.divergence.base import Spec, resolve_direction

IMPLEMENTATIONS = {"chunked": chunked.divergence_rows, "xla": xla.divergence_rows,
                   "pallas": pallas.divergence_rows}


@compiled.compiled
def per_position(logits, ref_logits, *, direction="reverse", where=None, temperature=1.0,
                 beta=0.5, chunk_size=None, ref_grad: bool = True,
                 vocab_axis: str | None = None, partition: _sharding.Partition | None = None,
                 implementation=None, softcap: float | None = None,
                 ref_softcap: float | None = None) -> jax.Array:
  """:func:`kl_per_position` with the internal switches the barrier and sharded paths use."""
  logits, ref_logits = jnp.asarray(logits), jnp.asarray(ref_logits)
  _checks.check_float("logits", logits)
  _checks.check_float("ref_logits", ref_logits)
  _checks.check_vocab("logits", logits)
  _checks.check_same_shape("logits", logits, "ref_logits", ref_logits)
  direction, beta = resolve_direction(direction, beta)
  temp = _checks.check_positive_if_static("temperature", temperature)
  cap, ref_cap = transform.resolve_caps(softcap, ref_softcap)
  impl = registry.names("kl_per_position", implementation, IMPLEMENTATIONS)
  lead, vocab = logits.shape[:-1], logits.shape[-1]
  chunks = chunking(chunk_size, vocab)
  mask = _checks.check_where(where, lead, "positions (logits.shape[:-1])")
  layout = None if vocab_axis else _sharding.resolve(
      partition, lead, vocab, position_inputs=(logits, ref_logits, mask),
      vocab_inputs=((logits, -1), (ref_logits, -1)))
  if layout is not None:  # each device runs this function on its own blocks

    def local(a, b, m, t):
      return per_position(a, b, direction=direction, where=m, beta=beta, chunk_size=chunk_size,
                          temperature=temperature if t is None else t, ref_grad=ref_grad,
                          vocab_axis=layout.vocab, implementation=impl, softcap=cap,
                          ref_softcap=math.inf if ref_cap is None else ref_cap)

    t = None if temp is not None else jnp.asarray(temperature)
    return _sharding.shard(local, layout, (logits, ref_logits, mask, t),
                           (layout.logits(), layout.logits(), layout.positions(), layout.scalar()))
  n = math.prod(lead)
  dtype = _checks.compute_dtype(logits, ref_logits)
  if n == 0:
    return jnp.zeros(lead, dtype)
  a, b = logits.reshape(n, vocab), ref_logits.reshape(n, vocab)
  mask = transform.rows_mask(mask, n)
  if not ref_grad:  # before any traced temperature, so d/dT keeps the reference's side
    b = jax.lax.stop_gradient(b)
  kernel_ref_grad = ref_grad
  if temp is None:  # traced temperature: transform outside the kernel so autodiff sees it
    a = transform.outside(a, mask, cap, temperature, dtype)
    b = transform.outside(b, mask, ref_cap, temperature, dtype)
    temp, cap, ref_cap, kernel_ref_grad = 1.0, None, None, True  # d/dT flows through both sides
  spec = Spec(direction=direction, beta=beta, inv_temperature=1.0 / temp, chunks=chunks,
              ref_grad=kernel_ref_grad, vocab_axis=vocab_axis, softcap=cap, ref_softcap=ref_cap)
  return registry.call("divergence", impl, IMPLEMENTATIONS, a, b, mask,
                       static=(spec,)).reshape(lead)


def kl_per_position(logits: jax.typing.ArrayLike, ref_logits: jax.typing.ArrayLike, *,
                    direction: str = "reverse", where: jax.typing.ArrayLike | None = None,
                    temperature: float | jax.Array = 1.0, beta: float = 0.5,
                    chunk_size: int | None = None,
                    partition: _sharding.Partition | None = None,
                    implementation: str | Sequence[str] | None = None,
                    softcap: float | None = None, ref_softcap: float | None = None) -> jax.Array:
  r"""Divergence between the student's and the reference's next-token distributions, per position.

  With p = softmax(s(logits) / T) and r = softmax(s_ref(ref_logits) / T) over the last axis,
  where s is the soft-cap (the identity without one, see ``softcap``):
  ``"reverse"``: KL(p || r) = sum_v p_v (log p_v - log r_v) (mode-seeking);
  ``"forward"``: KL(r || p);
  ``"js"``: beta KL(r || m) + (1 - beta) KL(p || m), m = (1 - beta) p + beta r, the generalized
  Jensen-Shannon divergence of TRL's ``generalized_jsd_loss`` (beta = 0.5 symmetric; beta = 0 is
  exactly KL(r || p), beta = 1 exactly KL(p || r)).

  Log-probabilities are valid inputs (log_softmax is idempotent). ``-inf`` entries are allowed
  (0 log 0 = 0, with a zero gradient); a student entry with mass where the reference has none
  gives +inf, as the KL does; a student row that is all ``-inf`` gives 0. A NaN (or +inf) in
  either row of a valid position gives NaN there: a diverged student never reads as KL 0.
  By default computed block by block in float32 with a custom VJP that recomputes, so only the
  inputs and their gradients are ever ``[N, V]``.

  Args:
    logits: student logits ``[..., V]``, any float dtype.
    ref_logits: reference logits, same shape.
    direction: ``"reverse"``, ``"forward"`` or ``"js"``.
    where: optional bool ``[...]``: False positions give exactly 0 and a zero gradient, even
      where their logits are NaN or inf.
    temperature: T > 0 dividing both logits; may be traced (then differentiable).
    beta: weight of the reference in ``"js"``, a static number in [0, 1].
    chunk_size: at most this many positions per block (per device when sharded); the blocks
      take rows spread over the whole batch, so the largest divisor of the position count
      within it is used. ``None`` lets the library choose for the platform the computation is
      lowered on (cache-sized blocks on CPU, device-filling ones on GPU and TPU).
    partition: a :class:`klagg_jax.Partition` naming the mesh axes the batch and the vocabulary
      are split over, to run each device's blocks in a ``shard_map``. Not needed for sharded
      inputs: on a classic ``Mesh`` under ``jit`` GSPMD partitions the kernel without gathering
      logits, and on ``Explicit`` axes the layout is read off the inputs.
    implementation: ``None`` (the library's choice per platform and shape), a name, or a
      sequence of names tried in order (one that cannot run here is skipped): ``"chunked"``
      (the memory-bounded custom-VJP kernel) or ``"xla"`` (the plain differentiable
      composition: holds ``[N, V]`` float32 residuals for its backward pass, and supports
      forward-mode AD, ``jax.jvp`` / ``jax.jacfwd``, which the custom VJP does not: there a
      ``TypeError`` says to pass ``implementation="xla"``).
    softcap: None, or a static cap c > 0 applied to the student's logits before the
      temperature: z -> c tanh(z / c) (Gemma's final-logit soft-capping); ``-inf`` stays
      ``-inf``. Applied per block, never materialized.
    ref_softcap: the reference's cap; None (default) takes ``softcap``. Pass
      ``ref_softcap=float("inf")`` for an uncapped reference under a capped student.

  Returns:
    float32 array of shape ``logits.shape[:-1]`` (float64 for float64 inputs with x64 on);
    sharded over the batch axis when the inputs are.

  Raises:
    ValueError: for a shape mismatch, V == 0, an unknown direction, beta outside [0, 1], a
      static temperature <= 0, a soft-cap that is not a static number > 0, a bad ``where`` or
      ``chunk_size``, an unknown ``implementation``,
      or a ``partition`` whose axes are not in the mesh or do not divide the shapes.

  .. math::

     \mathrm{KL}(p \,\|\, r) = \sum_v p_v (\log p_v - \log r_v), \qquad
     s(z) = c \tanh(z / c)

  Example:
    >>> kl = ka.kl_per_position(student_logits, base_logits, where=completion_mask)  # [B, T]
  """
  return per_position(logits, ref_logits, direction=direction, where=where,
                      temperature=temperature, beta=beta, chunk_size=chunk_size,
                      partition=partition, implementation=implementation, softcap=softcap,
                      ref_softcap=ref_softcap)
