"""The ``"xla"`` fused implementation: the logits materialized, the plain compositions after.

Masked rows of ``hidden`` are zeroed before the matmul, so NaN padding reaches neither the
logits nor, through 0 * NaN, the weight's gradient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from klagg_jax import _checks
from klagg_jax._ops.divergence import xla as divergence_xla
from klagg_jax._ops.fused.base import FusedSpec, LinearReference, TopkReference
from klagg_jax._ops.topk import xla as topk_xla


def _logits(hidden, weight, bias, mask, layout, precision):
  """``hidden @ weight + bias`` in the compute dtype, masked rows of ``hidden`` zeroed first."""
  h = jnp.where(mask[:, None], hidden, jnp.zeros((), hidden.dtype))
  w = weight if layout == "dv" else weight.T
  z = jnp.matmul(h, w, precision=precision,
                 preferred_element_type=_checks.compute_dtype(hidden, weight))
  return z if bias is None else z + bias.astype(z.dtype)[None, :]


def rows(hidden, weight, bias, ref_rows, ref_consts, mask, spec: FusedSpec, reduction):
  """The fused divergence with the logits materialized; differentiated by JAX."""
  z = _logits(hidden, weight, bias, mask, spec.weight_layout, spec.precision)
  block = spec.block
  if isinstance(block, LinearReference):
    ref_weight, ref_bias = ref_consts
    z_ref = jax.lax.stop_gradient(_logits(ref_rows[0], ref_weight, ref_bias, mask,
                                          block.weight_layout, block.precision))
    div_spec = dataclasses.replace(block.spec, softcap=spec.softcap, ref_grad=False)
    div = divergence_xla.divergence_rows(z, z_ref, mask, div_spec)
  elif isinstance(block, TopkReference):
    topk_spec = dataclasses.replace(
        block.spec, div=dataclasses.replace(block.spec.div, softcap=spec.softcap))
    div = topk_xla.topk_rows(z, *ref_rows, mask, topk_spec)
  else:
    raise NotImplementedError(f"no plain composition for the reference {type(block).__name__}")
  return div if reduction is None else div.sum()
