"""A tiny decoder-only transformer in Flax NNX, with KV-cached sampling.

Pre-LayerNorm blocks (causal multi-head attention, GELU MLP), learned positions, untied output
head. Training and scoring call the model on whole sequences; sampling runs one position at a
time through a key/value cache inside ``jax.lax.scan``. Pure functions over a parameter state
(``apply``, ``sample``) are what the training loops ``jit``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the transformer."""

    vocab: int = 256
    d_model: int = 96
    n_layers: int = 3
    n_heads: int = 4
    context: int = 128  # longest sequence (prompt + completion) the model sees

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


class Attention(nnx.Module):
    """Causal multi-head self-attention."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.qkv = nnx.Linear(cfg.d_model, 3 * cfg.d_model, rngs=rngs)
        self.out = nnx.Linear(
            cfg.d_model, cfg.d_model, rngs=rngs,
            kernel_init=nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layers)),
        )

    def _heads(self, x):
        b, t, _ = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        shape = (b, t, self.cfg.n_heads, self.cfg.d_head)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def _attend(self, q, k, v, mask):
        """``mask: [Tq, Tk]`` bool, True where a query may attend to a key."""
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.cfg.d_head)
        scores = jnp.where(mask[None, None], scores, -1e30)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return self.out(mixed.reshape(q.shape[0], q.shape[1], self.cfg.d_model))

    def __call__(self, x):
        """``x: [B, T, D]`` -> ``[B, T, D]``, each position attending to itself and earlier ones."""
        q, k, v = self._heads(x)
        t = x.shape[1]
        return self._attend(q, k, v, jnp.tril(jnp.ones((t, t), bool)))

    def step(self, x, pos, cache):
        """One position: ``x: [B, 1, D]`` at index ``pos``; ``cache = (k, v)``, each ``[B, L, H, Dh]``."""
        q, k, v = self._heads(x)
        k_cache = jax.lax.dynamic_update_slice_in_dim(cache[0], k, pos, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(cache[1], v, pos, axis=1)
        mask = (jnp.arange(k_cache.shape[1]) <= pos)[None, :]
        return self._attend(q, k_cache, v_cache, mask), (k_cache, v_cache)


class Block(nnx.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.attn = Attention(cfg, rngs)
        self.ln2 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.up = nnx.Linear(cfg.d_model, 4 * cfg.d_model, rngs=rngs)
        self.down = nnx.Linear(
            4 * cfg.d_model, cfg.d_model, rngs=rngs,
            kernel_init=nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layers)),
        )

    def _mlp(self, x):
        return self.down(jax.nn.gelu(self.up(self.ln2(x))))

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self._mlp(x)

    def step(self, x, pos, cache):
        a, cache = self.attn.step(self.ln1(x), pos, cache)
        x = x + a
        return x + self._mlp(x), cache


class Transformer(nnx.Module):
    """Decoder-only byte-level language model: ``tokens [B, T] -> logits [B, T, V]``."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(cfg.vocab, cfg.d_model, embedding_init=init, rngs=rngs)
        self.pos = nnx.Param(init(rngs.params(), (cfg.context, cfg.d_model)))
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, cfg.vocab, kernel_init=init, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos[...][None, : tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def step(self, token, pos, caches):
        """Logits ``[B, V]`` for one position given ``token [B]`` at index ``pos`` and the caches."""
        x = self.embed(token[:, None]) + jax.lax.dynamic_slice_in_dim(self.pos[...], pos, 1)[None]
        new = []
        for block, cache in zip(self.blocks, caches):
            x, cache = block.step(x, pos, cache)
            new.append(cache)
        return self.head(self.ln_f(x))[:, 0], tuple(new)

    def empty_cache(self, batch: int):
        shape = (batch, self.cfg.context, self.cfg.n_heads, self.cfg.d_head)
        zeros = jnp.zeros(shape, jnp.float32)
        return tuple((zeros, zeros) for _ in self.blocks)


def init(cfg: ModelConfig, seed: int):
    """A fresh model, split as ``(graphdef, params)`` for the pure functions below."""
    model = Transformer(cfg, nnx.Rngs(seed))
    return nnx.split(model, nnx.Param)


def apply(graphdef, params, tokens):
    """Logits ``[B, T, V]`` (float32) of ``tokens [B, T]``."""
    return nnx.merge(graphdef, params)(tokens)


def sample(graphdef, params, prompts, n_new: int, key, temperature: float = 1.0):
    """Sample ``n_new`` bytes after each prompt: ``prompts [B, P] -> completions [B, n_new]`` int32.

    The prompt is fed through the cache one position at a time, then each new token is drawn
    from ``softmax(logits / temperature)``. ``P + n_new`` must not exceed the model's context.
    """
    model = nnx.merge(graphdef, params)
    batch, n_prompt = prompts.shape
    total = n_prompt + n_new
    if total > model.cfg.context:
        raise ValueError(f"prompt {n_prompt} + completion {n_new} > context {model.cfg.context}")
    buf = jnp.concatenate([prompts, jnp.zeros((batch, n_new), prompts.dtype)], axis=1)
    keys = jax.random.split(key, total - 1)

    def body(carry, pos):
        buf, caches = carry
        logits, caches = model.step(buf[:, pos], pos, caches)
        drawn = jax.random.categorical(keys[pos], logits / temperature).astype(buf.dtype)
        nxt = jnp.where(pos + 1 < n_prompt, buf[:, pos + 1], drawn)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, nxt[:, None], pos + 1, axis=1)
        return (buf, caches), None

    (buf, _), _ = jax.lax.scan(body, (buf, model.empty_cache(batch)), jnp.arange(total - 1))
    return buf[:, n_prompt:]
