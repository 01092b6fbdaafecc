"""The ``"pallas"`` fused implementation: the chunked block loops with a Pallas block step.

The row-block loops, the matmuls and the gradient accumulation are those of
:mod:`klagg_jax._ops.fused.chunked`; what changes is the step between the matmuls. Each block's
``[C, V]`` student and reference logits (soft-capped, temperature-scaled and masked by the same
XLA code as the chunked path) go to the Pallas kernels of
:mod:`klagg_jax._ops.divergence.pallas`: the divergence and the row statistics in one read of
the block (two for js), then the gradient into the student logits in one more read and one
write. The reference gets no gradient, so none is formed. Triton on GPU, Mosaic on TPU, Pallas'
interpreter on CPU (a correctness mode), chosen when the program is lowered.

Inside the library's ``shard_map`` (a vocabulary-split head), the kernels run on each device's
vocabulary shard and the row statistics are merged over ``spec.vocab_axis`` with ``[C]``
collectives, as the chunked step merges its own.

Refused with ``NotImplementedError`` (so a sequence of implementations falls through): the
stored top-k teacher (:func:`klagg_jax.fused_linear_kl_topk`, whose block math differs),
float64, and whatever the Pallas block step refuses.
"""

from __future__ import annotations

import dataclasses

from klagg_jax import _checks
from klagg_jax._ops.divergence import pallas as pallas_div
from klagg_jax._ops.divergence.base import Spec
from klagg_jax._ops.fused import chunked
from klagg_jax._ops.fused.base import FusedSpec, LinearReference


def _kernel_spec(spec: Spec) -> Spec:
  """The block step's spec: the caps are applied to the logits before it (as in the chunked
  path), so the kernel sees none."""
  return dataclasses.replace(spec, softcap=None, ref_softcap=None)


@dataclasses.dataclass(frozen=True)
class PallasLinearReference(LinearReference):
  """:class:`LinearReference` whose block step is the Pallas kernels (student gradient only)."""

  def forward(self, logits, ref_rows, ref_consts, mask):
    b = self.logits(ref_rows, ref_consts, mask)
    return pallas_div.block_forward(logits, b, _kernel_spec(self.spec))

  def backward(self, logits, ref_rows, ref_consts, stats, mask):
    b = self.logits(ref_rows, ref_consts, mask)
    return pallas_div.block_backward(logits, b, stats, _kernel_spec(self.spec),
                                     ref_grad=False)[0]

  def value_and_grad(self, logits, ref_rows, ref_consts, mask):
    b = self.logits(ref_rows, ref_consts, mask)
    spec = _kernel_spec(self.spec)
    div, stats = pallas_div.block_forward(logits, b, spec)
    return div, pallas_div.block_backward(logits, b, stats, spec, ref_grad=False)[0]


def _pallas_spec(hidden, weight, ref_rows, ref_consts, spec: FusedSpec) -> FusedSpec:
  """``spec`` with its reference block swapped for the Pallas one; raises where it cannot run."""
  block = spec.block
  if not isinstance(block, LinearReference):
    raise NotImplementedError(f"the Pallas fused head runs the full-logits reference only; "
                              f"{type(block).__name__} (e.g. a stored top-k teacher) has other "
                              "block math.")
  for side, dtype in (("student", _checks.compute_dtype(hidden, weight)),
                      ("reference", _checks.compute_dtype(ref_rows[0], ref_consts[0]))):
    if dtype.itemsize > 4:
      raise NotImplementedError(f"the Pallas fused head computes in float32; {dtype} "
                                f"{side} logits are left to another implementation.")
    pallas_div.check_block(dtype, _kernel_spec(block.spec))
  pallas_block = PallasLinearReference(block.spec, block.weight_layout, block.precision)
  return dataclasses.replace(spec, block=pallas_block)


def rows(hidden, weight, bias, ref_rows, ref_consts, mask, spec: FusedSpec, reduction):
  """The fused divergence with the Pallas block step: ``[N]`` for ``reduction=None``, else the
  sum over valid rows (the chunked path's contract)."""
  spec = _pallas_spec(hidden, weight, ref_rows, ref_consts, spec)
  return chunked.rows(hidden, weight, bias, ref_rows, ref_consts, mask, spec, reduction)
