"""Data-moving collectives of every kernel on a classic Mesh (Auto axes) under jit, no partition=.

For each kernel and layout (the batch, the vocabulary, both, the batch over two mesh axes) on 8
simulated CPU devices: how many all-gathers the compiled program holds, and the largest
all-gather / all-to-all / collective-permute result in elements. Compile only.

    python benchmarks/sharding_collectives.py
"""
import os, re, math, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import klagg_jax as ka
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
B, T, V, D, K = 8, 64, 512, 32, 8
rng = np.random.default_rng(0); f = lambda *s: rng.standard_normal(s).astype(np.float32)
a, b, h, rh, wt, rwt = 2*f(B,T,V), 2*f(B,T,V), f(B,T,D), f(B,T,D), f(D,V)/3, f(D,V)/3
lp, idx, tl = (np.asarray(x) for x in ka.topk_logprobs(b, K))
def colls(hlo):
    out = []
    for m in re.finditer(r"=\s*(.*?)\s(all-gather|all-to-all|collective-permute)(-start)?\(", hlo):
        shapes = re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1))
        out += [(m.group(2), math.prod(int(s) for s in d.split(",") if s)) for d in shapes]
    return out
put = lambda x, *s: jax.device_put(x, NamedSharding(mesh, P(*s)))
print(f"classic Mesh 2x4 (Auto), jit, no partition=; B={B} T={T} V={V} D={D} k={K}; one device's logits share = {B*T*V//8} elements, [N,k] = {B*T*K}")
print("| function | batch | vocab | both | batch over 2 axes |")
print("|---|---|---|---|---|")
layouts = {"batch": ("data", None), "vocab": (None, "model"), "both": ("data", "model"), "batch2": (("data","model"), None)}
fns = {
 "kl_per_position (value+vjp)": lambda A, Bb, H, W, RH, RW, LP, I, TL: jax.vjp(lambda x: ka.kl_per_position(x, Bb), A)[1](jnp.ones((B, T))),
 "kl_barrier (value+grad)": lambda A, Bb, *r: jax.value_and_grad(lambda x: ka.kl_barrier(x, Bb)[0])(A),
 "topk_logprobs": lambda A, Bb, *r: ka.topk_logprobs(Bb, K),
 "kl_topk (value+grad)": lambda A, Bb, H, W, RH, RW, LP, I, TL: jax.value_and_grad(lambda x: ka.kl_topk(x, LP, I, TL).sum())(A),
 "fused_linear_kl (grad)": lambda A, Bb, H, W, RH, RW, *r: jax.grad(lambda h, w: ka.fused_linear_kl(h, w, RH, RW).sum(), (0, 1))(H, W),
 "fused_linear_kl mean (grad)": lambda A, Bb, H, W, RH, RW, *r: jax.grad(lambda h, w: ka.fused_linear_kl(h, w, RH, RW, reduction="mean"), (0, 1))(H, W),
 "fused_linear_kl_topk mean (grad)": lambda A, Bb, H, W, RH, RW, LP, I, TL: jax.grad(lambda h, w: ka.fused_linear_kl_topk(h, w, LP, I, TL, reduction="mean"), (0, 1))(H, W),
 "kl_estimate + aggregate p95 (grad)": lambda A, Bb, H, W, RH, RW, LP, I, TL: jax.grad(lambda x: ka.aggregate(ka.kl_estimate(x, TL), "p95").mean())(LP[..., 0]),
}
rows = {k: [] for k in fns}
for lname, (bs, vs) in layouts.items():
    args = (put(a, bs, None, vs), put(b, bs, None, vs), put(h, bs, None, None), put(wt, None, vs),
            put(rh, bs, None, None), put(rwt, None, vs), put(lp, bs, None, None), put(idx, bs, None, None), put(tl, bs, None))
    for name, fn in fns.items():
        c = colls(jax.jit(fn).lower(*args).compile().as_text())
        gathers = [n for k, n in c if k == "all-gather"]
        rows[name].append(f"{len(gathers)} all-gathers, largest move {max([n for _, n in c], default=0)}")
for name, cells in rows.items():
    print(f"| {name} | " + " | ".join(cells) + " |")
