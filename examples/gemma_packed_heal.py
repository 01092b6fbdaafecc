"""A Gemma-shaped heal: tied embeddings, a final logit soft-cap, packed rows, a fused barrier.

What the JAX LLM stacks (MaxText, tunix, Levanter, Flax NNX code) hand a loss function:

* **tied embeddings**: the LM head is the embedding table, ``[V, D]``, so the fused head takes
  ``weight_layout="vd"``;
* **a final soft-cap**: Gemma 2 and 3 turn logits ``z`` into ``cap * tanh(z / cap)`` (cap 30);
  ``softcap=`` applies it inside the fused head's blocks, with its gradient, so neither model's
  ``[B, T, V]`` logits are ever made;
* **packed rows**: several sequences share a row, marked by ``segment_ids`` (1, 2, ... per
  sequence, 0 for the padding tail); attention stays inside a segment and positions restart at
  each one. The barrier aggregates *per segment* (``segment_ids=`` on ``ka.aggregate``), hinges per
  segment and averages over the segments that hold completion tokens, so one drifting sequence is
  not averaged with its row-mates.

The NLL uses the student's capped logits, for brevity (a fused cross-entropy would avoid them).
Each step prints the NLL, the per-segment divergence (rmse), the fraction of segments over tau
and the barrier's pull; the last lines check the fused, capped, packed barrier against the same
sequences unpacked with materialized logits.

Run:  python examples/gemma_packed_heal.py      (KLAGG_EXAMPLE_STEPS=3 for a smoke run)
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import klagg_jax as ka

VOCAB, DIM, HEADS, LAYERS = 128, 32, 4, 2
SOFTCAP = 30.0  # Gemma 2/3's final_logit_softcapping
ROW, ROWS = 64, 8  # packed rows of 64 tokens
PROMPT = 6  # each sequence: a prompt of 6 tokens, then a completion that counts up from it
MAX_SEGMENTS = 4  # at most this many sequences per row (a static bound, as jit needs)
TAU, LAM, AGG = 0.5, 4.0, "rmse"
STEPS = int(os.environ.get("KLAGG_EXAMPLE_STEPS", "24"))


class RMSNorm(nnx.Module):
  def __init__(self, dim: int):
    self.scale = nnx.Param(jnp.zeros((dim,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    return x * (1.0 + self.scale[...])  # Gemma's (1 + scale)


class Block(nnx.Module):
  """Pre-norm decoder block: attention within a segment, then a GeGLU MLP."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
    self.attn = nnx.MultiHeadAttention(HEADS, dim, decode=False, use_bias=False, rngs=rngs)
    self.gate = nnx.Linear(dim, 4 * dim, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(dim, 4 * dim, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(4 * dim, dim, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x), mask=mask)
    h = self.norm2(x)
    return x + self.down(jax.nn.gelu(self.gate(h)) * self.up(h))


class TinyGemma(nnx.Module):
  """Embedding (tied with the LM head) -> decoder blocks -> RMSNorm; logits soft-capped."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)  # [V, D]: also the LM head
    self.pos = nnx.Embed(ROW, DIM, rngs=rngs)
    self.blocks = nnx.List([Block(DIM, rngs=rngs) for _ in range(LAYERS)])
    self.norm_f = RMSNorm(DIM)

  def hidden(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """Final hidden states ``[B, T, D]``; a token attends to earlier tokens of its segment only."""
    x = self.embed(tokens) * math.sqrt(DIM) + self.pos(positions)
    t = jnp.arange(tokens.shape[-1])
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = (same & (t[:, None] >= t[None, :]))[:, None]  # [B, 1, T, T]: causal, one segment
    for block in self.blocks:
      x = block(x, mask)
    return self.norm_f(x)

  def __call__(self, tokens, segment_ids, positions) -> jax.Array:
    z = self.hidden(tokens, segment_ids, positions) @ self.embed.embedding[...].T
    return SOFTCAP * jnp.tanh(z / SOFTCAP)  # materialized only for the NLL and the final check


def make_batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Packed rows: 2 to 4 sequences of unequal length each, then a padding tail.

  ``mask`` marks the next-token targets that are completion tokens of a sequence (where the NLL
  and the barrier apply); ``segment_ids`` is 1, 2, ... per sequence and 0 on the padding.
  """
  tokens = np.zeros((ROWS, ROW + 1), np.int32)
  seg = np.zeros((ROWS, ROW + 1), np.int32)
  pos = np.zeros((ROWS, ROW + 1), np.int32)
  target = np.zeros((ROWS, ROW + 1), bool)
  for b in range(ROWS):
    start = 0
    for s in range(1, rng.integers(2, MAX_SEGMENTS + 1) + 1):
      length = int(rng.integers(PROMPT + 4, 18))
      if start + length > ROW + 1:
        break
      prompt = rng.integers(0, VOCAB, PROMPT)
      completion = (prompt[-1] + 1 + np.arange(length - PROMPT)) % VOCAB
      tokens[b, start:start + length] = np.concatenate([prompt, completion])
      seg[b, start:start + length] = s
      pos[b, start:start + length] = np.arange(length)
      target[b, start + PROMPT:start + length] = True
      start += length
  # Inputs t predict targets t + 1 of the same segment.
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg[:, :-1],
          "positions": pos[:, :-1], "mask": target[:, 1:] & same}


def segment_barrier(kl: jax.Array, batch) -> tuple[jax.Array, jax.Array, jax.Array]:
  """lam * mean over non-empty segments of hinge(rmse of the segment's KL - tau)."""
  div = ka.aggregate(kl, AGG, where=batch["mask"], segment_ids=batch["segment_ids"],
                     max_segments=MAX_SEGMENTS)  # [B, MAX_SEGMENTS]
  ids = jnp.arange(1, MAX_SEGMENTS + 1)
  live = ((batch["segment_ids"][..., None] == ids) & batch["mask"][..., None]).any(-2)
  n = jnp.maximum(live.sum(), 1)
  loss = LAM * jnp.sum(jnp.where(live, ka.hinge(div, TAU), 0.0)) / n
  return loss, div, live


def main() -> None:
  model = TinyGemma(rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  _, base_params = nnx.split(nnx.clone(model))  # the frozen base
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  def run(p, batch):
    return nnx.merge(graphdef, p), batch["inputs"], batch["segment_ids"], batch["positions"]

  def nll_fn(p, batch):
    m, x, seg, pos = run(p, batch)
    nll = optax.softmax_cross_entropy_with_integer_labels(m(x, seg, pos), batch["targets"])
    return ka.mean(nll, where=batch["mask"], axis=None)

  def barrier_fn(p, batch):
    student, x, seg, pos = run(p, batch)
    base = nnx.merge(graphdef, base_params)
    base_hidden = jax.lax.stop_gradient(base.hidden(x, seg, pos))
    kl = ka.fused_linear_kl(  # [B, T], the capped logits of neither model ever made
        student.hidden(x, seg, pos), student.embed.embedding[...],
        base_hidden, base.embed.embedding[...],
        weight_layout="vd", softcap=SOFTCAP, where=batch["mask"])
    return segment_barrier(kl, batch)

  @jax.jit
  def train_step(params, opt_state, batch):
    def loss_fn(p):
      nll = nll_fn(p, batch)
      barrier, div, live = barrier_fn(p, batch)
      return nll + barrier, (nll, div, live)

    (_, (nll, div, live)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    pressure = ka.grad_pressure(lambda p, b: barrier_fn(p, b)[0], nll_fn, params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    n = jnp.maximum(live.sum(), 1)
    metrics = {"nll": nll, "div": jnp.sum(jnp.where(live, div, 0.0)) / n,
               "fired": jnp.sum(live & (div > TAU)) / n, "pressure": pressure}
    return optax.apply_updates(params, updates), opt_state, metrics

  rng = np.random.default_rng(0)
  print(f"TinyGemma V={VOCAB} D={DIM} layers={LAYERS} softcap={SOFTCAP}, {ROWS} packed rows of "
        f"{ROW} tokens (<= {MAX_SEGMENTS} sequences each), barrier agg={AGG} per segment "
        f"tau={TAU} lam={LAM}")
  print("| step | nll | div (rmse) | fired | g_bar/g_nll |")
  print("|---|---|---|---|---|")
  start = time.perf_counter()
  for step in range(STEPS):
    params, opt_state, m = train_step(params, opt_state, make_batch(rng))
    m = jax.device_get(m)
    print(f"| {step} | {m['nll']:.3f} | {m['div']:.3f} | {m['fired']:.2f} | {m['pressure']:.2f} |")
  print(f"\n{STEPS} steps in {time.perf_counter() - start:.1f} s (first step includes compilation)")

  # The fused, capped, per-segment divergence is what materialized capped logits give, and the
  # packed per-segment aggregate is the one of the same sequences unpacked (padded with where).
  batch = make_batch(rng)
  student, x, seg, pos = run(params, batch)
  base = nnx.merge(graphdef, base_params)
  kl = ka.fused_linear_kl(student.hidden(x, seg, pos), student.embed.embedding[...],
                          base.hidden(x, seg, pos), base.embed.embedding[...],
                          weight_layout="vd", softcap=SOFTCAP, where=batch["mask"])
  kl_logits = ka.kl_per_position(student(x, seg, pos), base(x, seg, pos), where=batch["mask"])
  print(f"max |fused softcap - kl_per_position(capped logits)| = "
        f"{float(jnp.abs(kl - kl_logits).max()):.1e}")
  packed = ka.aggregate(kl, AGG, where=batch["mask"], segment_ids=batch["segment_ids"],
                        max_segments=MAX_SEGMENTS)
  worst = 0.0
  for b in range(ROWS):
    for s in range(1, MAX_SEGMENTS + 1):
      in_seg = batch["segment_ids"][b] == s
      if not in_seg.any():
        continue
      alone = ka.aggregate(kl[b][in_seg], AGG, where=batch["mask"][b][in_seg])
      worst = max(worst, abs(float(packed[b, s - 1]) - float(alone)))
  print(f"max |packed per-segment {AGG} - unpacked| = {worst:.1e}")


if __name__ == "__main__":
  main()
