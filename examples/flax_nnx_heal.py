"""Fine-tune ("heal") a tiny Flax NNX language model under a KL barrier to its frozen base.

loss = NLL on the completion tokens + ka.kl_barrier(student_logits, base_logits, where=mask):
the barrier is 0 while the per-sequence rmse of the per-position KL(student || base) stays
under tau, and pushes back on the sequences where it does not. The table shows the SFT pulling
the student away from its base until the barrier fires, then the barrier holding the divergence
near tau while the NLL keeps falling. ``g_bar/g_nll`` is ka.grad_pressure: ~0 inert, ~1
balanced, >> 1 the barrier fights the fine-tuning.

Run:  python examples/flax_nnx_heal.py      (KLAGG_EXAMPLE_STEPS=3 for a smoke run)
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import klagg_jax as ka

VOCAB, DIM, HEADS = 64, 32, 4
PROMPT, COMPLETION, BATCH = 8, 16, 16
TAU, LAM, AGG = 0.5, 4.0, "rmse"
STEPS = int(os.environ.get("KLAGG_EXAMPLE_STEPS", "40"))


class TinyLM(nnx.Module):
  """One pre-norm transformer block: embeddings -> causal attention -> MLP -> LM head."""

  def __init__(self, vocab: int, dim: int, max_len: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.pos = nnx.Embed(max_len, dim, rngs=rngs)
    self.norm1, self.norm2, self.norm_f = (nnx.LayerNorm(dim, rngs=rngs) for _ in range(3))
    self.attn = nnx.MultiHeadAttention(HEADS, dim, decode=False, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * dim, dim, rngs=rngs)
    self.lm_head = nnx.Linear(dim, vocab, rngs=rngs)  # kernel [D, V]

  def hidden(self, tokens: jax.Array) -> jax.Array:
    """Final hidden states [B, T, D] (what the LM head sees)."""
    x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[-1]))
    x = x + self.attn(self.norm1(x), mask=nnx.make_causal_mask(tokens))
    x = x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(x))))
    return self.norm_f(x)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.lm_head(self.hidden(tokens))  # logits [B, T, V]


@jax.jit
def make_batch(key: jax.Array) -> dict[str, jax.Array]:
  """Random prompts; the completion counts up from the prompt's last token (the new skill).

  Next-token inputs/targets over [prompt | completion]; ``mask`` marks the targets that are
  completion tokens, where both the NLL and the barrier apply.
  """
  prompt = jax.random.randint(key, (BATCH, PROMPT), 0, VOCAB)
  completion = (prompt[:, -1:] + 1 + jnp.arange(COMPLETION)) % VOCAB
  tokens = jnp.concatenate([prompt, completion], axis=1)
  mask = jnp.arange(PROMPT + COMPLETION - 1) >= PROMPT - 1
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "mask": jnp.broadcast_to(mask, (BATCH, PROMPT + COMPLETION - 1))}


def main() -> None:
  model = TinyLM(VOCAB, DIM, PROMPT + COMPLETION, rngs=nnx.Rngs(0))
  base = nnx.clone(model)  # the frozen reference: never updated, never differentiated
  graphdef, params = nnx.split(model)
  _, base_params = nnx.split(base)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  def logits_fn(p, tokens):
    return nnx.merge(graphdef, p)(tokens)

  def nll_fn(p, batch):
    nll = optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, batch["inputs"]),
                                                          batch["targets"])
    return ka.mean(nll, where=batch["mask"], axis=None)  # mean over completion tokens

  def barrier_fn(p, batch, base_logits):
    return ka.kl_barrier(logits_fn(p, batch["inputs"]), base_logits, where=batch["mask"],
                         agg=AGG, tau=TAU, lam=LAM)

  @jax.jit
  def train_step(params, opt_state, batch):
    base_logits = logits_fn(base_params, batch["inputs"])

    def loss_fn(p):
      nll = nll_fn(p, batch)
      barrier, metrics = barrier_fn(p, batch, base_logits)
      return nll + barrier, (nll, metrics)

    (_, (nll, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    # Diagnostics: ||grad barrier|| / ||grad nll|| (log it every few steps in a real run).
    pressure = ka.grad_pressure(lambda p, b: barrier_fn(p, b, base_logits)[0], nll_fn,
                                params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics = dict(metrics, nll=nll, pressure=pressure)
    return optax.apply_updates(params, updates), opt_state, metrics

  print(f"TinyLM V={VOCAB} D={DIM}, batch {BATCH} x {PROMPT + COMPLETION - 1}, "
        f"barrier agg={AGG} tau={TAU} lam={LAM}")
  print("| step | nll | div (rmse) | kl_mean | kl_max | fired | g_bar/g_nll |")
  print("|---|---|---|---|---|---|---|")
  start, key = time.perf_counter(), jax.random.key(1)
  for step in range(STEPS):
    key, sub = jax.random.split(key)
    params, opt_state, m = train_step(params, opt_state, make_batch(sub))
    m = jax.device_get(m)
    print(f"| {step} | {m['nll']:.3f} | {m['div']:.3f} | {m['kl_mean']:.3f} | {m['kl_max']:.3f} "
          f"| {m['fired']:.2f} | {m['pressure']:.2f} |")
  nnx.update(model, params)  # the trained student, back in the NNX object
  print(f"\n{STEPS} steps in {time.perf_counter() - start:.1f} s (first step includes compilation)")


if __name__ == "__main__":
  main()
