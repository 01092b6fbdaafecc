"""Pre-train the base model on the docstring corpus, cached on disk by config.

The cache is ``<cache_dir>/base-<key>.npz`` (parameters) plus ``base-<key>.json`` (its held-out
loss and how it was trained), where ``key`` hashes every ``BaseConfig`` field and the corpus text,
so a change to either retrains and a rerun with the same config skips training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.loops import data, model
from experiments.loops.config import BaseConfig


def lm_loss(graphdef, params, tokens):
    """Mean next-token negative log-likelihood (nats per byte) of ``tokens [B, T+1]``."""
    logits = model.apply(graphdef, params, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def heldout_batches(corpus: data.Corpus, cfg: BaseConfig, n_batches: int) -> np.ndarray:
    """Fixed held-out windows ``[n_batches, batch, seq_len + 1]`` (the same in every run)."""
    rng = np.random.default_rng(12345)
    return np.stack([data.lm_batch(corpus.heldout, cfg.batch, cfg.seq_len, rng)
                     for _ in range(n_batches)])


@functools.lru_cache(maxsize=None)
def make_eval_loss(graphdef):
    """``f(params, batches) -> mean held-out NLL`` over ``[n, B, T+1]`` batches, jitted."""

    @jax.jit
    def f(params, batches):
        return jax.lax.map(lambda b: lm_loss(graphdef, params, b), batches).mean()

    return f


def _paths(cache_dir: pathlib.Path, key: str):
    return cache_dir / f"base-{key}.npz", cache_dir / f"base-{key}.json"


def save_params(path: pathlib.Path, params) -> None:
    leaves = jax.tree.leaves(params)
    np.savez(path, **{f"p{i}": np.asarray(x) for i, x in enumerate(leaves)})


def load_params(path: pathlib.Path, like):
    """Parameters saved by ``save_params``, in the structure of ``like`` (shapes are checked)."""
    leaves, treedef = jax.tree.flatten(like)
    with np.load(path) as f:
        loaded = [f[f"p{i}"] for i in range(len(leaves))]
    for a, b in zip(leaves, loaded):
        if a.shape != b.shape:
            raise ValueError(f"cached parameter shape {b.shape} != model's {a.shape}: stale cache")
    return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in loaded])


def train_base(cfg: BaseConfig, corpus: data.Corpus, cache_dir, n_heldout: int, log=print):
    """The base model ``(graphdef, params, info)``, trained now or loaded from ``cache_dir``.

    ``info`` holds ``heldout_loss`` (nats/byte on ``n_heldout`` fixed held-out batches),
    ``train_loss`` (mean of the last 50 steps), ``seconds``, ``cached`` and ``key``.
    """
    cache_dir = pathlib.Path(cache_dir)
    key = cfg.key(corpus.digest)
    npz, meta = _paths(cache_dir, key)
    graphdef, params = model.init(cfg.model, cfg.seed)
    eval_loss = make_eval_loss(graphdef)
    held = jnp.asarray(heldout_batches(corpus, cfg, n_heldout))
    if npz.exists() and meta.exists():
        params = load_params(npz, params)
        info = json.loads(meta.read_text())
        info["heldout_loss"] = float(eval_loss(params, held))
        info["cached"] = True
        log(f"base: loaded {npz.name} (held-out loss {info['heldout_loss']:.3f} nats/byte)")
        return graphdef, params, info

    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.steps, cfg.lr / 10)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    state = opt.init(params)

    @jax.jit
    def step(params, state, tokens):
        loss, grads = jax.value_and_grad(lambda p: lm_loss(graphdef, p, tokens))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(cfg.seed)
    start, losses = time.time(), []
    every = max(cfg.steps // 6, 1)
    for i in range(1, cfg.steps + 1):
        batch = jnp.asarray(data.lm_batch(corpus.train, cfg.batch, cfg.seq_len, rng))
        params, state, loss = step(params, state, batch)
        losses.append(loss)
        if i % every == 0 or i == cfg.steps:
            recent = float(jnp.mean(jnp.stack(losses[-50:])))
            log(f"base: step {i}/{cfg.steps}  train loss {recent:.3f}  "
                f"({time.time() - start:.0f}s)")
    info = {
        "key": key,
        "config": dataclasses.asdict(cfg),
        "train_loss": float(jnp.mean(jnp.stack(losses[-50:]))),
        "seconds": time.time() - start,
        "heldout_loss": float(eval_loss(params, held)),
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_params(npz, params)
    meta.write_text(json.dumps(info, indent=2))
    info["cached"] = False
    log(f"base: held-out loss {info['heldout_loss']:.3f} nats/byte, saved {npz.name}")
    return graphdef, params, info
