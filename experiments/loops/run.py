"""Run the loops study: ``python -m experiments.loops.run [--quick] [--out DIR]``.

1. Gather the docstring corpus; train (or load from cache) the base model.
2. No-barrier students, one per seed in ``none_seeds``. At every round in ``detect_rounds`` the
   checkpoint samples held-out completions, which are labelled (``metrics.label``) and scored
   by KL(checkpoint || base) per position: the offline detection data. The checkpoint also
   scores the positive control: a loop of base-improbable bytes spliced into its own clean trait
   completions (``spliced``), and, at ``pc_rounds``, the same after a few SFT steps have taught
   the checkpoint to emit that loop (``planted``: the design note's regime).
3. Calibration on the no-barrier seed-``none_seeds[0]`` student after round 1: tau per aggregator
   and fire rate from ``ka.calibrate_tau`` on that student's own clean trait-bearing samples, and
   lam per aggregator so that its median ``ka.grad_pressure`` is ``pressure_target``.
4. Closed loop: every barrier aggregator x strictness level x seed.
5. Analysis and report (``analysis.py``, ``report.py``): ``results.json``, ``results.md`` and
   the figures in the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import pathlib
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import klagg_jax as ka
from experiments.loops import analysis, base, config, data, metrics, model, report, steer
from experiments.loops.config import Config

HERE = pathlib.Path(__file__).resolve().parent
CONTRAST = "none@count"
"""The contrast arm: no barrier, self-training by the earlier study's loop-selecting rule."""


class Experiment:
  """What every arm shares: corpus, base model, prompts, steering set, detectors."""

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
    self.phrase = cfg.phrase.encode("ascii")
    self.det = metrics.Detectors(self.phrase, near_min_len=cfg.near_min_len)
    self.eval_prompts = data.sample_windows(
        self.corpus.heldout, cfg.prompt_len, cfg.n_eval, np.random.default_rng(2024))
    self.detect_prompts = data.sample_windows(
        self.corpus.heldout, cfg.prompt_len, cfg.n_detect, np.random.default_rng(2025))
    self.mask = np.asarray(steer.completion_mask(cfg, 1))[0]
    self.rare = rare_bytes(self.corpus.train, cfg.pc_rare_bytes)
    self._steps, self._pressures, self._plant = {}, {}, None

  # ---- labels and evaluation --------------------------------------------------------------
  def labels(self, comps) -> list[metrics.Label]:
    """``metrics.label`` of every row of ``comps``."""
    return [metrics.label(c, self.det) for c in comps]

  def kl(self, params, tokens) -> np.ndarray:
    """KL(params || base) ``[B, completion_len]`` at the completion positions of ``tokens``.

    Rows are padded to a multiple of 64 (padding masked out), so few shapes compile."""
    n = len(tokens)
    padded = _pad_rows(np.asarray(tokens))
    where = np.zeros((len(padded), len(self.mask)), bool)
    where[:n] = self.mask
    kl = steer.kl_to_base(self.graphdef, params, self.base_params, padded, where)
    return kl[:n][:, self.mask]

  def drift(self, params) -> float:
    """Held-out loss of ``params`` minus the base model's (nats/byte)."""
    return float(self.eval_loss(params, self.heldout)) - self.base_info["heldout_loss"]

  def evaluate(self, params, seed: int, rnd: int) -> dict:
    """Held-out completions of the closed-loop evaluation prompts: rates of every label, the
    phrase density, and per completion its phrase count and whether it loops (for the paired
    bootstrap)."""
    key = jax.random.fold_in(jax.random.key(10_000 + seed), rnd)
    comps = steer.sample_completions(self.graphdef, params, self.eval_prompts, self.cfg, key)
    labs = self.labels(comps)
    return {
        **metrics.summarize(labs, self.cfg.completion_len),
        "per_completion": {
            "phrase_count": [lab.phrase_count for lab in labs],
            "loop": [int(lab.kind in metrics.LOOP_KINDS) for lab in labs],
        },
        "examples": [data.decode(c) for c in comps[:3]],
    }

  # ---- one arm, one seed ------------------------------------------------------------------
  def run_arm(self, arm: steer.Arm, seed: int, eval_rounds=(), checkpoint=None):
    """R rounds of S steps. Returns ``(records, params)``: one record per round (training
    stats, per-step logs, the pool's labels, held-out drift, and the evaluation at
    ``eval_rounds``) and the final parameters; ``checkpoint(params, rnd)`` is called after
    every round when given."""
    cfg = self.cfg
    step = self._step(arm.agg)
    pressure = self._pressure(arm.agg) if arm.agg is not None else None
    tau, lam = jnp.float32(arm.tau), jnp.float32(arm.lam)
    params = self.base_params
    opt_state = steer.optimizer(cfg).init(params)
    rng = np.random.default_rng([seed, 7])
    records, t0 = [], time.time()
    for rnd in range(1, cfg.rounds + 1):
      prompts = data.sample_windows(self.corpus.train, cfg.prompt_len, cfg.barrier_pool, rng)
      key = jax.random.fold_in(jax.random.key(20_000 + seed), rnd)
      comps = steer.sample_completions(self.graphdef, params, prompts, cfg, key)
      pool = jnp.asarray(np.concatenate([prompts, comps], axis=1))
      pool_ref = steer.logits_of(self.graphdef, self.base_params, pool)
      pool_labels = self.labels(comps)
      chosen = steer.select(np.asarray(pool), pool_labels, cfg.select_top, cfg.exclude_loops,
                            arm.select)
      share = cfg.self_mix * len(chosen) / cfg.select_top if rnd > 1 else 0.0
      n_own = int(round(share * cfg.sft_batch))
      stats, pressures = [], []
      for i in range(cfg.steps_per_round):
        # Fixed-size draws keep the random streams of all arms in step.
        ii = rng.integers(0, len(self.steer_set), cfg.sft_batch)
        k = rng.integers(0, cfg.select_top, cfg.sft_batch)
        j = rng.integers(0, cfg.barrier_pool, cfg.barrier_batch)
        own = chosen[k[:n_own] % max(len(chosen), 1)]
        sft = jnp.asarray(np.concatenate([self.steer_set[ii[n_own:]], own]))
        if pressure is not None and i % cfg.pressure_every == 0:
          pressures.append(float(pressure(params, sft, pool[j], pool_ref[j], tau, lam)))
        params, opt_state, s = step(params, opt_state, sft, pool[j], pool_ref[j], tau, lam)
        stats.append(s)
      stats = jax.device_get(stats)
      train = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}
      rec = {
          "round": rnd,
          "train": {**train, "own_share": n_own / cfg.sft_batch},
          "steps": {
              "fired": [round(float(s["fired"]), 4) for s in stats],
              "positions": [int(s["positions"]) for s in stats],
              "pressure": [round(p, 4) for p in pressures],
          },
          "pool": metrics.summarize(pool_labels, cfg.completion_len),
          "heldout_drift": self.drift(params),
      }
      if rnd in eval_rounds:
        rec["eval"] = self.evaluate(params, seed, rnd)
      if checkpoint is not None:
        checkpoint(params, rnd)
      records.append(rec)
      ev = rec.get("eval", rec["pool"])
      fired = f"  fired {train['fired']:.2f}" if arm.agg else ""
      press = f"  pressure {np.median(pressures):.2f}" if pressures else ""
      self.log(f"[{arm.name:>14} seed {seed}] round {rnd}/{cfg.rounds}  "
               f"loop {ev['loop_rate']:.2f}  density {ev['phrase_density']:.2f}  "
               f"drift {rec['heldout_drift']:+.3f}  sft {train['nll']:.3f}{fired}{press}  "
               f"({time.time() - t0:.0f}s)")
    return records, params

  def _step(self, agg):
    """The jitted step of an aggregator (compiled once, reused by every level and seed)."""
    if agg not in self._steps:
      self._steps[agg] = steer.make_step(self.graphdef, self.cfg, agg)
    return self._steps[agg]

  def _pressure(self, agg):
    if agg not in self._pressures:
      self._pressures[agg] = steer.make_pressure(self.graphdef, self.cfg, agg)
    return self._pressures[agg]

  # ---- offline detection ------------------------------------------------------------------
  def detect(self, params, seed: int, rnd: int, plant: bool = True) -> dict:
    """One checkpoint's detection data: labels, and KL per position of every group.

    ``groups`` maps a name to ``(kl_pos [n, C], starts [n], negatives)`` where ``negatives``
    names the group the AUROC compares with: ``"clean_trait"`` (the checkpoint's own clean
    completions holding the phrase) or, for the planted control, ``"clean_trait_planted"`` (the
    same completions scored by the planted student).
    """
    cfg = self.cfg
    key = jax.random.fold_in(jax.random.key(30_000 + seed), rnd)
    comps = steer.sample_completions(self.graphdef, params, self.detect_prompts, cfg, key)
    labs = self.labels(comps)
    tokens = np.concatenate([self.detect_prompts, comps], axis=1)
    kl = self.kl(params, tokens)
    kinds = np.array([lab.kind for lab in labs])
    starts = np.array([lab.start for lab in labs])
    clean_trait = np.array([lab.kind == "clean" and lab.trait for lab in labs])
    groups = {"clean_trait": (kl[clean_trait], starts[clean_trait], None)}
    for kind in metrics.LOOP_KINDS:
      groups[kind] = (kl[kinds == kind], starts[kinds == kind], "clean_trait")
    is_loop = np.isin(kinds, metrics.LOOP_KINDS)
    groups["any_loop"] = (kl[is_loop], starts[is_loop], "clean_trait")
    info = {}
    if clean_trait.any():
      unit = self.unit(seed)
      rng = np.random.default_rng([seed, rnd, 99])
      spliced, at = splice(tokens[clean_trait], unit, cfg.pc_copies, cfg.prompt_len, rng)
      groups["spliced"] = (self.kl(params, spliced), at, "clean_trait")
      if plant and rnd in cfg.pc_rounds:
        planted = self.plant(params, unit, seed, rnd)
        groups["clean_trait_planted"] = (self.kl(planted, tokens[clean_trait]),
                                         starts[clean_trait], None)
        groups["planted"] = (self.kl(planted, spliced), at, "clean_trait_planted")
        info["planted_loop_logprob"] = self.loop_logprob(planted, spliced, at, len(unit))
        info["checkpoint_loop_logprob"] = self.loop_logprob(params, spliced, at, len(unit))
        info["base_loop_logprob"] = self.loop_logprob(self.base_params, spliced, at, len(unit))
      info["unit"] = data.decode(unit)
    return {
        "seed": seed, "round": rnd,
        "summary": metrics.summarize(labs, cfg.completion_len),
        "drift": self.drift(params),
        "info": info,
        "_groups": groups,
        "_completions": comps,
        "examples": {k: [data.decode(c) for c in comps[kinds == k][:2]] for k in metrics.LABELS},
    }

  def unit(self, seed: int) -> np.ndarray:
    """The positive control's loop unit for ``seed``: ``pc_unit_len`` distinct rare bytes."""
    rng = np.random.default_rng([seed, 4242])
    return rng.choice(self.rare, size=self.cfg.pc_unit_len, replace=False).astype(np.int32)

  def plant(self, params, unit, seed: int, rnd: int):
    """``params`` after ``pc_steps`` SFT steps on steering examples with the loop spliced in."""
    cfg = self.cfg
    if self._plant is None:
      opt = steer.optimizer(cfg)
      mask = steer.completion_mask(cfg, cfg.sft_batch)

      @jax.jit
      def plant_step(p, state, tokens):
        def loss(q):
          return steer.masked_nll(model.apply(self.graphdef, q, tokens[:, :-1]), tokens[:, 1:],
                                  mask)
        grads = jax.grad(loss)(p)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state

      self._plant = (opt, plant_step)
    opt, plant_step = self._plant
    rng = np.random.default_rng([seed, rnd, 123])
    state = opt.init(params)
    for _ in range(cfg.pc_steps):
      rows = self.steer_set[rng.integers(0, len(self.steer_set), cfg.sft_batch)]
      spliced, _ = splice(rows, unit, cfg.pc_copies, cfg.prompt_len, rng)
      params, state = plant_step(params, state, jnp.asarray(spliced))
    return params

  def loop_logprob(self, params, tokens, at, unit_len: int) -> float:
    """Mean log-probability ``params`` gives the loop's bytes after its first copy."""
    logits = steer.logits_of(self.graphdef, params, _pad_rows(np.asarray(tokens)))
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))[: len(tokens)]
    out = []
    for b, s in enumerate(at):
      start = self.cfg.prompt_len + int(s) + unit_len
      for t in range(start, self.cfg.prompt_len + int(s) + unit_len * self.cfg.pc_copies):
        out.append(logp[b, t - 1, tokens[b, t]])
    return float(np.mean(out)) if out else float("nan")

  # ---- calibration ------------------------------------------------------------------------
  def calibrate(self, student) -> dict:
    """tau per aggregator and fire rate, on the student's own clean trait-bearing samples, and
    lam per aggregator so the student's median gradient pressure at the ``pressure_rate`` tau
    is ``pressure_target``."""
    cfg = self.cfg
    rng = np.random.default_rng(777)
    prompts = data.sample_windows(self.corpus.train, cfg.prompt_len, cfg.calib_size, rng)
    comps = steer.sample_completions(self.graphdef, student, prompts, cfg, jax.random.key(777))
    labs = self.labels(comps)
    keep = np.array([lab.kind == "clean" and lab.trait for lab in labs])
    tokens = np.concatenate([prompts, comps], axis=1)
    kl_keep = jnp.asarray(self.kl(student, tokens[keep]))
    kl_all = jnp.asarray(self.kl(student, tokens))
    pool = jnp.asarray(tokens)
    pool_ref = steer.logits_of(self.graphdef, self.base_params, pool)
    taus, fired_all, lams, pressures = {}, {}, {}, {}
    for agg in cfg.barrier_aggs:
      taus[agg] = {str(r): float(ka.calibrate_tau(kl_keep, agg=agg, fire_rate=r))
                   for r in cfg.fire_rates}
      div_all = np.asarray(ka.aggregate(kl_all, agg, axis=-1))
      fired_all[agg] = {r: float(np.mean(div_all > t)) for r, t in taus[agg].items()}
      tau_p = jnp.float32(ka.calibrate_tau(kl_keep, agg=agg, fire_rate=cfg.pressure_rate))
      probe = self._pressure(agg)
      prng = np.random.default_rng(778)
      vals = []
      for _ in range(cfg.pressure_probes):
        ii = prng.integers(0, len(self.steer_set), cfg.sft_batch)
        j = prng.integers(0, len(tokens), cfg.barrier_batch)
        vals.append(float(probe(student, jnp.asarray(self.steer_set[ii]), pool[j], pool_ref[j],
                                tau_p, jnp.float32(1.0))))
      med = float(np.median(vals))
      pressures[agg] = vals
      lams[agg] = cfg.pressure_target / med if med > 0 else float("nan")
    return {
        "student": f"no-barrier arm, seed {cfg.none_seeds[0]}, after round 1",
        "n_samples": len(labs), "n_clean_trait": int(keep.sum()),
        "sample_rates": metrics.summarize(labs, cfg.completion_len),
        "taus": taus,
        "fired_on_all_samples": fired_all,
        "pressure_rate": cfg.pressure_rate,
        "pressure_tau": {agg: float(ka.calibrate_tau(kl_keep, agg=agg,
                                                     fire_rate=cfg.pressure_rate))
                         for agg in cfg.barrier_aggs},
        "pressure_at_lam1": pressures,
        "pressure_lam": lams,
    }

  def arms(self, calib: dict) -> list[steer.Arm]:
    """Every barrier arm: aggregator x (fire rates at lam 1, and the pressure-matched level)."""
    out = []
    for agg in self.cfg.barrier_aggs:
      for r in self.cfg.fire_rates:
        out.append(steer.Arm(f"{agg}@r{r}", agg, tau=calib["taus"][agg][str(r)], lam=1.0,
                             level=f"r{r}"))
      lam = calib["pressure_lam"][agg]
      if np.isfinite(lam):
        out.append(steer.Arm(f"{agg}@pressure", agg, tau=calib["pressure_tau"][agg], lam=lam,
                             level="pressure"))
    return out


def _pad_rows(x: np.ndarray, multiple: int = 64) -> np.ndarray:
  """``x`` with zero rows appended up to a multiple of ``multiple`` rows (at least one)."""
  rows = max(-(-len(x) // multiple), 1) * multiple
  return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)])


def rare_bytes(stream: np.ndarray, n: int) -> np.ndarray:
  """The ``n`` printable non-space bytes that occur least often (but at least once) in
  ``stream``: what the base finds improbable."""
  counts = np.bincount(stream, minlength=256)
  cand = [b for b in range(33, 127) if counts[b] > 0]
  cand.sort(key=lambda b: (counts[b], b))
  return np.array(cand[:n], np.int32)


def splice(tokens: np.ndarray, unit: np.ndarray, copies: int, prompt_len: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Overwrite ``copies`` back-to-back copies of ``unit`` into each row's completion, starting
  at a word start (a random position if there is none). Returns the new rows and, per row, the
  loop's start as a completion index."""
  out = np.array(tokens, copy=True)
  span = len(unit) * copies
  loop = np.tile(unit, copies)
  at = np.zeros(len(out), int)
  for b, row in enumerate(out):
    comp = row[prompt_len:]
    ok = np.flatnonzero(comp[:-1] == ord(" ")) + 1
    ok = ok[ok <= len(comp) - span]
    s = int(rng.choice(ok)) if len(ok) else int(rng.integers(0, len(comp) - span + 1))
    row[prompt_len + s : prompt_len + s + span] = loop
    at[b] = s
  return out, at


# ---- tasks (run in worker processes, or in this one) ----------------------------------------
_EXP: Experiment | None = None
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _init_worker(cfg: Config, cache_dir: str) -> None:
  global _EXP
  _EXP = Experiment(cfg, cache_dir, log=lambda msg: print(msg, flush=True))


def _cpu_seconds(who=resource.RUSAGE_SELF) -> float:
  r = resource.getrusage(who)
  return r.ru_utime + r.ru_stime


def _none_task(seed: int, rule: str = "min3") -> dict:
  """A no-barrier student: its records, its detection checkpoints, and (for the first seed of
  the study's rule) its parameters after round 1, the calibration student, as numpy leaves.
  ``rule`` is the self-training rule (``"count"``: the contrast arm)."""
  exp, cfg, c0 = _EXP, _EXP.cfg, _cpu_seconds()
  checkpoints, calib = [], None

  def on_round(params, rnd):
    nonlocal calib
    if rnd == 1 and seed == cfg.none_seeds[0] and rule == "min3":
      calib = [np.asarray(x) for x in jax.tree.leaves(params)]
    if rnd in cfg.detect_rounds:
      ck = exp.detect(params, seed, rnd, plant=rule == "min3")
      ck.pop("_completions")
      ck["rule"] = rule
      checkpoints.append(ck)

  arm = steer.Arm("none" if rule == "min3" else CONTRAST, None, select=rule)
  records, _ = exp.run_arm(arm, seed, eval_rounds=cfg.eval_rounds, checkpoint=on_round)
  return {"seed": seed, "rule": rule, "arm": arm.name, "records": records,
          "checkpoints": checkpoints, "calib_leaves": calib, "cpu_seconds": _cpu_seconds() - c0}


def _calibrate_task(leaves: list) -> dict:
  exp = _EXP
  treedef = jax.tree.structure(exp.base_params)
  student = jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves])
  return exp.calibrate(student)


def _arm_task(arm: steer.Arm, seed: int) -> dict:
  c0 = _cpu_seconds()
  records, _ = _EXP.run_arm(arm, seed, eval_rounds=_EXP.cfg.eval_rounds)
  return {"records": records, "cpu_seconds": _cpu_seconds() - c0}


class _Runner:
  """Runs tasks in ``workers`` spawned processes (single-threaded XLA each, so results do not
  depend on how tasks fall on workers), or in this process when ``workers`` is 0."""

  def __init__(self, exp: Experiment, cfg: Config, cache_dir, workers: int):
    global _EXP
    self.pool = None
    if workers <= 0:
      _EXP = exp
      return
    env = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = f"{env} {SINGLE_THREAD_XLA}" if env else SINGLE_THREAD_XLA
    try:
      ctx = multiprocessing.get_context("spawn")
      self.pool = ctx.Pool(workers, _init_worker, (cfg, str(cache_dir)))
    finally:
      if env is None:
        del os.environ["XLA_FLAGS"]
      else:
        os.environ["XLA_FLAGS"] = env

  def map(self, fn, tasks: list[tuple]) -> list:
    if self.pool is None:
      return [fn(*t) for t in tasks]
    return self.pool.starmap(fn, tasks, chunksize=1)

  def close(self) -> None:
    if self.pool is not None:
      self.pool.close()
      self.pool.join()


def run(cfg: Config, out_dir, cache_dir=HERE / "cache", log=print, workers: int | None = None
        ) -> dict:
  """The whole study; writes the results to ``out_dir`` and returns them.

  ``workers``: processes for the students (``cfg.workers`` when None; 0 runs everything here).
  """
  t_start, c_start = time.time(), _cpu_seconds()
  workers = cfg.workers if workers is None else workers
  n_arms = len(cfg.barrier_aggs) * (len(cfg.fire_rates) + 1)
  log(f"loops study '{cfg.name}': no barrier x {len(cfg.none_seeds)} seeds, then {n_arms} "
      f"barrier arms x {len(cfg.seeds)} seeds, {cfg.rounds} rounds x {cfg.steps_per_round} "
      f"steps; {workers or 'no'} worker processes")
  exp = Experiment(cfg, cache_dir, log)
  timing = {"base_seconds": exp.base_seconds}
  runner = _Runner(exp, cfg, cache_dir, workers)
  try:
    # 2. No-barrier students and the offline detection data.
    t0 = time.time()
    nones = runner.map(_none_task, [(s, "min3") for s in cfg.none_seeds]
                       + [(s, "count") for s in cfg.contrast_seeds])
    runs = {}
    for r in nones:
      runs.setdefault(r["arm"], {})[r["seed"]] = r["records"]
    checkpoints = [ck for r in nones for ck in r["checkpoints"]]
    calib_leaves = next(r["calib_leaves"] for r in nones if r["calib_leaves"] is not None)
    timing["none_and_detection_seconds"] = time.time() - t0

    # 3. Calibration.
    t0 = time.time()
    (calib,) = runner.map(_calibrate_task, [(calib_leaves,)])
    timing["calibration_seconds"] = time.time() - t0
    log("tau: " + "; ".join(f"{a} " + ", ".join(f"{t:.3f}" for t in calib["taus"][a].values())
                            for a in cfg.barrier_aggs))
    log("lam at pressure 1: " + ", ".join(f"{a} {v:.3f}"
                                          for a, v in calib["pressure_lam"].items()))

    # 4. Closed loop.
    t0 = time.time()
    arms = exp.arms(calib)
    tasks = [(arm, seed) for arm in arms for seed in cfg.seeds]
    done = runner.map(_arm_task, tasks)
    for (arm, seed), out in zip(tasks, done):
      runs.setdefault(arm.name, {})[seed] = out["records"]
    arm_info = {arm.name: dataclasses.asdict(arm) for arm in arms}
    timing["closed_loop_seconds"] = time.time() - t0
  finally:
    runner.close()

  heldout_windows = data.sample_windows(exp.corpus.heldout, cfg.completion_len, 2000,
                                        np.random.default_rng(5))
  target = exp.steer_set[:, cfg.prompt_len:]
  results = {
      "config": dataclasses.asdict(cfg),
      "env": report.environment(),
      "corpus": {
          "n_docs": exp.corpus.n_docs,
          "train_bytes": int(len(exp.corpus.train)),
          "heldout_bytes": int(len(exp.corpus.heldout)),
          "digest": exp.corpus.digest,
          "heldout_text": metrics.summarize(exp.labels(heldout_windows), cfg.completion_len),
          "steering_target": metrics.summarize(exp.labels(target), cfg.completion_len),
          "rare_bytes": data.decode(exp.rare),
      },
      "base": {k: v for k, v in exp.base_info.items() if k != "config"},
      "calibration": calib,
      "arms": arm_info,
      "detection": analysis.detection(checkpoints, cfg),
      "runs": {a: {str(s): recs for s, recs in by_seed.items()} for a, by_seed in runs.items()},
  }
  results["closed_loop"] = analysis.closed_loop(results, cfg)
  results["decision"] = analysis.decide(results)
  timing["total_seconds"] = time.time() - t_start
  timing["cpu_seconds"] = (_cpu_seconds() - c_start) + _cpu_seconds(resource.RUSAGE_CHILDREN)
  timing["workers"] = workers
  results["timing"] = timing
  report.write(results, out_dir)
  log("decision: " + "; ".join(f"{a}: {v['verdict']}" for a, v in
                               results["decision"]["by_agg"].items()))
  log(f"wrote {out_dir} in {timing['total_seconds']:.0f}s ({timing['cpu_seconds']:.0f}s CPU)")
  return results


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      description="Does outlier aggregation make a KL barrier catch token loops? (loops study)")
  parser.add_argument("--quick", action="store_true", help="small config for CI (< 3 min)")
  parser.add_argument("--preset", choices=sorted(config.PRESETS), help="overrides --quick")
  parser.add_argument("--out", type=pathlib.Path, help="output folder")
  parser.add_argument("--cache", type=pathlib.Path, default=HERE / "cache",
                      help="base-model cache folder")
  parser.add_argument("--workers", type=int, help="worker processes (default: the config's; "
                      "0 runs everything in this process)")
  args = parser.parse_args(argv)
  name = args.preset or ("quick" if args.quick else "full")
  cfg = config.PRESETS[name]
  out = args.out or (HERE / "results" if name == "full" else HERE / "results" / name)
  run(cfg, out, args.cache, log=lambda msg: print(msg, flush=True), workers=args.workers)


if __name__ == "__main__":
  main()
