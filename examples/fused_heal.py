"""The heal of flax_nnx_heal.py with the barrier taken from hidden states and the LM head.

ka.fused_linear_kl(hidden, kernel, base_hidden, base_kernel, bias=..., where=mask) gives the
per-position KL(student || base) of the logits hidden @ kernel + bias without ever making the
[B, T, V] logits of either model, in the forward or the backward pass; ka.aggregate and
ka.hinge then build the per-sequence barrier that ka.kl_barrier builds from logits. The NLL
still uses the student's logits here, for brevity: at a large vocabulary pair the barrier with
a fused cross-entropy (e.g. tokamax's linear_softmax_cross_entropy_loss).

Run:  python examples/fused_heal.py      (KLAGG_EXAMPLE_STEPS=3 for a smoke run)
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import klagg_jax as ka
from flax_nnx_heal import (  # the model, data and settings of the first example
    AGG, COMPLETION, DIM, LAM, PROMPT, STEPS, TAU, VOCAB, TinyLM, make_batch)


def main() -> None:
  model = TinyLM(VOCAB, DIM, PROMPT + COMPLETION, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  _, base_params = nnx.split(nnx.clone(model))  # the frozen base
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  def nll_fn(p, batch):
    logits = nnx.merge(graphdef, p)(batch["inputs"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return ka.mean(nll, where=batch["mask"], axis=None)

  def barrier_fn(p, batch):
    student, base = nnx.merge(graphdef, p), nnx.merge(graphdef, base_params)
    base_hidden = jax.lax.stop_gradient(base.hidden(batch["inputs"]))
    kl = ka.fused_linear_kl(  # [B, T]; kernels are [D, V], Flax Dense layout
        student.hidden(batch["inputs"]), student.lm_head.kernel[...],
        base_hidden, base.lm_head.kernel[...],
        bias=student.lm_head.bias[...], ref_bias=base.lm_head.bias[...], where=batch["mask"])
    div = ka.aggregate(kl, AGG, where=batch["mask"])  # [B]: one aggregate per sequence
    return LAM * ka.hinge(div, TAU).mean(), div  # every sequence has completion positions

  @jax.jit
  def train_step(params, opt_state, batch):
    def loss_fn(p):
      nll = nll_fn(p, batch)
      barrier, div = barrier_fn(p, batch)
      return nll + barrier, (nll, barrier, div)

    (_, (nll, barrier, div)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    pressure = ka.grad_pressure(lambda p, b: barrier_fn(p, b)[0], nll_fn, params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics = {"nll": nll, "barrier": barrier, "div": div.mean(), "fired": (div > TAU).mean(),
               "pressure": pressure}
    return optax.apply_updates(params, updates), opt_state, metrics

  print(f"TinyLM V={VOCAB} D={DIM}, fused barrier agg={AGG} tau={TAU} lam={LAM}")
  print("| step | nll | barrier | div (rmse) | fired | g_bar/g_nll |")
  print("|---|---|---|---|---|---|")
  start, key = time.perf_counter(), jax.random.key(1)
  for step in range(STEPS):
    key, sub = jax.random.split(key)
    params, opt_state, m = train_step(params, opt_state, make_batch(sub))
    m = jax.device_get(m)
    print(f"| {step} | {m['nll']:.3f} | {m['barrier']:.3f} | {m['div']:.3f} | {m['fired']:.2f} "
          f"| {m['pressure']:.2f} |")
  print(f"\n{STEPS} steps in {time.perf_counter() - start:.1f} s (first step includes compilation)")

  @jax.jit
  def fused_vs_logits(params, batch):
    """The fused divergence is the one kl_per_position computes from materialized logits."""
    student, base = nnx.merge(graphdef, params), nnx.merge(graphdef, base_params)
    x, mask = batch["inputs"], batch["mask"]
    fused = ka.fused_linear_kl(student.hidden(x), student.lm_head.kernel[...],
                               base.hidden(x), base.lm_head.kernel[...],
                               bias=student.lm_head.bias[...], ref_bias=base.lm_head.bias[...],
                               where=mask)
    return jnp.abs(fused - ka.kl_per_position(student(x), base(x), where=mask)).max()

  diff = float(fused_vs_logits(params, make_batch(key)))
  print(f"max |fused - kl_per_position(logits)| = {diff:.1e}")


if __name__ == "__main__":
  main()
