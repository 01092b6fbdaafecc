"""Run the loops experiment: ``python -m experiments.loops.run [--quick] [--out DIR]``.

1. Gather the docstring corpus; train (or load from cache) the base model.
2. Run the no-barrier arm for every seed; its seed-0 student after round 1 is the calibration
   student (coherent, already steered).
3. Calibrate each barrier's tau with ``ka.calibrate_tau`` on the per-position KL between that
   student and the base, on base-model completions, at one shared fire rate.
4. Run every barrier arm for every seed, with that tau and the shared lam.
5. Write ``results.json``, ``results.md`` and ``loops.png`` to the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import klagg_jax as ka
from experiments.loops import base, config, data, metrics, report, steer
from experiments.loops.config import Config

HERE = pathlib.Path(__file__).resolve().parent
BARRIER_AGGS = ("mean", "rmse", "p95", "soft_p95", "cvar95")


class Experiment:
    """Holds what every arm shares: corpus, base model, prompts, steering set, held-out batches."""

    def __init__(self, cfg: Config, cache_dir, log=print):
        self.cfg, self.log = cfg, log
        self.corpus = data.load_corpus()
        t0 = time.time()
        self.graphdef, self.base_params, self.base_info = base.train_base(
            cfg.base, self.corpus, cache_dir, cfg.heldout_batches, log)
        self.base_seconds = time.time() - t0
        self.heldout = jnp.asarray(base.heldout_batches(self.corpus, cfg.base, cfg.heldout_batches))
        self.eval_loss = base.make_eval_loss(self.graphdef)
        self.steer_set = steer.steering_set(self.corpus, cfg)
        self.eval_prompts = data.sample_windows(
            self.corpus.heldout, cfg.prompt_len, cfg.n_eval, np.random.default_rng(2024))
        self.mask = np.asarray(steer.completion_mask(cfg, 1))[0]
        self.phrase = cfg.phrase.encode("ascii")
        self._steps = {}

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate(self, params, seed: int, rnd: int) -> dict:
        """Sample held-out completions and measure loops, trait, held-out loss and KL to base."""
        key = jax.random.fold_in(jax.random.key(10_000 + seed), rnd)
        comps = steer.sample_completions(self.graphdef, params, self.eval_prompts, self.cfg, key)
        tokens = np.concatenate([self.eval_prompts, comps], axis=1)
        kl = steer.kl_to_base(self.graphdef, params, self.base_params, tokens,
                              np.broadcast_to(self.mask, (len(tokens), len(self.mask))))
        looped = np.array([metrics.has_loop(c) for c in comps])
        held = float(self.eval_loss(params, self.heldout))
        return {
            "round": rnd,
            "loop_rate": float(looped.mean()),
            "trait_rate": metrics.trait_rate(comps, self.phrase),
            "heldout_loss": held,
            "heldout_drift": held - self.base_info["heldout_loss"],
            "longest_repeat_mean": float(np.mean([metrics.longest_repeat(c)[0] for c in comps])),
            "examples": [data.decode(c) for c in comps[:3]],
            # Kept for the detection analysis after calibration, dropped before writing JSON.
            "_kl": kl[:, self.mask],
            "_looped": looped,
        }

    # ---- one arm, one seed ------------------------------------------------------------------
    def run_arm(self, arm: steer.Arm, seed: int, round0: dict, snapshot_round=None):
        """R rounds of S steps; returns (per-round records, params snapshot at ``snapshot_round``)."""
        cfg = self.cfg
        step = self._step(arm)
        params = self.base_params
        opt_state = steer.optimizer(cfg).init(params)
        rng = np.random.default_rng([seed, 7])
        records, snapshot, t0 = [round0], None, time.time()
        for rnd in range(1, cfg.rounds + 1):
            prompts = data.sample_windows(self.corpus.train, cfg.prompt_len, cfg.barrier_pool, rng)
            key = jax.random.fold_in(jax.random.key(20_000 + seed), rnd)
            comps = steer.sample_completions(self.graphdef, params, prompts, cfg, key)
            pool = jnp.asarray(np.concatenate([prompts, comps], axis=1))
            pool_ref = steer.logits_of(self.graphdef, self.base_params, pool)
            chosen = steer.select(np.asarray(pool), comps, self.phrase, cfg.select_top)
            share = cfg.self_mix * len(chosen) / cfg.select_top if rnd > 1 else 0.0
            n_own = int(round(share * cfg.sft_batch))
            stats = []
            for _ in range(cfg.steps_per_round):
                # Fixed-size draws keep the random streams of all arms in step.
                i = rng.integers(0, len(self.steer_set), cfg.sft_batch)
                k = rng.integers(0, cfg.select_top, cfg.sft_batch)
                j = rng.integers(0, cfg.barrier_pool, cfg.barrier_batch)
                own = chosen[k[:n_own] % max(len(chosen), 1)]
                sft = np.concatenate([self.steer_set[i[n_own:]], own])
                params, opt_state, s = step(params, opt_state, jnp.asarray(sft),
                                            pool[j], pool_ref[j])
                stats.append(s)
            train = {k: float(np.mean([float(s[k]) for s in stats])) for k in stats[0]}
            rec = self.evaluate(params, seed, rnd)
            rec["train"] = {**train, "own_share": n_own / cfg.sft_batch}
            records.append(rec)
            if rnd == snapshot_round:
                snapshot = params
            fired = f"  fired {train['fired']:.2f}" if arm.agg else ""
            self.log(f"[{arm.name:>8} seed {seed}] round {rnd}/{cfg.rounds}  "
                     f"loop {rec['loop_rate']:.2f}  trait {rec['trait_rate']:.2f}  "
                     f"drift {rec['heldout_drift']:+.3f}  sft {train['nll']:.3f}{fired}  "
                     f"kl_p95 {train['kl_p95']:.2f}  ({time.time() - t0:.0f}s)")
        return records, snapshot

    def _step(self, arm):
        """The jitted step of ``arm``, compiled once and reused by every seed."""
        if arm not in self._steps:
            self._steps[arm] = steer.make_step(self.graphdef, self.cfg, arm)
        return self._steps[arm]

    # ---- calibration ------------------------------------------------------------------------
    def calibrate(self, student) -> dict:
        """tau per aggregator: ``calibrate_tau`` of KL(student || base) on base-model completions."""
        cfg = self.cfg
        rng = np.random.default_rng(777)
        prompts = data.sample_windows(self.corpus.train, cfg.prompt_len, cfg.calib_size, rng)
        comps = steer.sample_completions(self.graphdef, self.base_params, prompts, cfg,
                                         jax.random.key(777))
        tokens = np.concatenate([prompts, comps], axis=1)
        where = jnp.asarray(np.broadcast_to(self.mask, (len(tokens), len(self.mask))))
        kl = jnp.asarray(steer.kl_to_base(self.graphdef, student, self.base_params, tokens, where))
        taus = {agg: float(ka.calibrate_tau(kl, agg=agg, where=where, fire_rate=cfg.fire_rate))
                for agg in BARRIER_AGGS}
        return {
            "taus": taus,
            "base_completion_loop_rate": metrics.loop_rate(comps),
            "kl_mean_on_calibration_set": float(np.asarray(kl)[:, self.mask].mean()),
        }


def detection(runs: dict, taus: dict) -> dict:
    """For every barrier aggregator at its tau: how often it would fire on looping vs clean
    held-out completions, pooled over every arm, seed and round >= 1."""
    kls = [r["_kl"] for arm in runs.values() for recs in arm.values() for r in recs[1:]]
    loops = [r["_looped"] for arm in runs.values() for recs in arm.values() for r in recs[1:]]
    kl, looped = np.concatenate(kls), np.concatenate(loops)
    out = {"n_looping": int(looped.sum()), "n_clean": int((~looped).sum())}
    for agg, tau in taus.items():
        div = np.asarray(ka.aggregate(jnp.asarray(kl), agg, axis=-1))
        out[agg] = {
            "tau": tau,
            "fired_looping": float((div[looped] > tau).mean()) if looped.any() else None,
            "fired_clean": float((div[~looped] > tau).mean()) if (~looped).any() else None,
            "median_div_looping": float(np.median(div[looped])) if looped.any() else None,
            "median_div_clean": float(np.median(div[~looped])) if (~looped).any() else None,
        }
    return out


def run(cfg: Config, out_dir, cache_dir=HERE / "cache", log=print) -> dict:
    """The whole experiment; writes the results to ``out_dir`` and returns them."""
    t_start = time.time()
    log(f"loops experiment '{cfg.name}': {len(cfg.arms)} arms x {len(cfg.seeds)} seeds x "
        f"{cfg.rounds} rounds x {cfg.steps_per_round} steps")
    exp = Experiment(cfg, cache_dir, log)
    round0 = {seed: exp.evaluate(exp.base_params, seed, 0) for seed in cfg.seeds}
    log(f"base: loop rate {np.mean([r['loop_rate'] for r in round0.values()]):.3f}, "
        f"trait rate {np.mean([r['trait_rate'] for r in round0.values()]):.3f} on held-out prompts")

    runs, arm_seconds = {}, {}
    t0 = time.time()
    runs["none"], calib_student = {}, None
    for seed in cfg.seeds:
        recs, snap = exp.run_arm(steer.Arm("none", None), seed, round0[seed],
                                 snapshot_round=1 if seed == cfg.seeds[0] else None)
        runs["none"][seed] = recs
        calib_student = snap if snap is not None else calib_student
    arm_seconds["none"] = time.time() - t0

    t0 = time.time()
    calib = exp.calibrate(calib_student)
    calib.update(student=f"no-barrier arm, seed {cfg.seeds[0]}, after round 1",
                 fire_rate=cfg.fire_rate, lam=cfg.lam, seconds=time.time() - t0)
    log("tau at fire rate {:.2f}: {}".format(
        cfg.fire_rate, ", ".join(f"{a} {t:.3f}" for a, t in calib["taus"].items())))

    for name in cfg.arms:
        if name == "none":
            continue
        arm = steer.Arm(name, name, tau=calib["taus"][name], lam=cfg.lam)
        t0 = time.time()
        runs[name] = {seed: exp.run_arm(arm, seed, round0[seed])[0] for seed in cfg.seeds}
        arm_seconds[name] = time.time() - t0
    runs = {name: runs[name] for name in cfg.arms if name in runs}

    heldout_windows = data.sample_windows(exp.corpus.heldout, cfg.completion_len, 2000,
                                          np.random.default_rng(5))
    results = {
        "config": dataclasses.asdict(cfg),
        "env": report.environment(),
        "corpus": {
            "n_docs": exp.corpus.n_docs,
            "train_bytes": int(len(exp.corpus.train)),
            "heldout_bytes": int(len(exp.corpus.heldout)),
            "digest": exp.corpus.digest,
            "heldout_text_loop_rate": metrics.loop_rate(heldout_windows),
        },
        "base": {k: v for k, v in exp.base_info.items() if k != "config"},
        "calibration": calib,
        "detection": detection(runs, calib["taus"]),
        "runs": {a: {str(s): [report.public(r) for r in recs] for s, recs in by_seed.items()}
                 for a, by_seed in runs.items()},
    }
    results["summary"] = report.summarize(results)
    results["timing"] = {"total_seconds": time.time() - t_start,
                         "base_seconds": exp.base_seconds, "arm_seconds": arm_seconds}
    report.write(results, out_dir)
    log(f"wrote {out_dir} in {results['timing']['total_seconds']:.0f}s")
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Steer a tiny byte-level LM under a KL barrier, one arm per aggregator.")
    parser.add_argument("--quick", action="store_true", help="tiny config for CI (< 2 min)")
    parser.add_argument("--preset", choices=sorted(config.PRESETS), help="overrides --quick")
    parser.add_argument("--out", type=pathlib.Path, help="output folder")
    parser.add_argument("--cache", type=pathlib.Path, default=HERE / "cache",
                        help="base-model cache folder")
    args = parser.parse_args(argv)
    name = args.preset or ("quick" if args.quick else "full")
    cfg = config.PRESETS[name]
    out = args.out or (HERE / "results" if name == "full" else HERE / "results" / name)
    run(cfg, out, args.cache, log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    main()
