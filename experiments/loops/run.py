"""Run the loops study: ``python -m experiments.loops.run [--quick | --preset NAME] [--out DIR]``.

The study is a list of units of work, each saved to ``OUT/units/`` as soon as it is done; a rerun
with the same command skips the units already there, so an interrupted run resumes where it
stopped (``OUT/units/config.json`` must match the config, or the run refuses to mix them).

1. ``calibration``: a no-barrier student of the pilot seed trains one round; tau of every barrier
   aggregator is ``ka.calibrate_tau`` at ``calib_rate`` on that student's own clean
   trait-bearing samples.
2. ``pilot``: at the pilot seed, the no-barrier arm and every barrier aggregator at every lam of
   ``pilot_lams``. The *design* follows from it: per aggregator, the lam whose final trait
   density (interpolated in log lam) hits each target, ``target_fracs`` x the pilot no-barrier
   student's density, so every aggregator's arms aim at the same trait range.
3. ``main``: the primary condition (loops left out of self-training): the no-barrier arm and
   every aggregator at every target, for every seed, seed by seed. Each run also takes detection
   checkpoints after the rounds in ``detect_rounds``: held-out completions labelled and scored by
   KL(checkpoint || base) per position, and the graded positive control.
4. ``ablation``: the earlier self-training (loops kept), every aggregator at one target, on seeds
   of its own.
5. Analysis and report (``analysis.py``, ``report.py``): ``results.json``, ``results.md`` and the
   figures in the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import pathlib
import resource
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

import klagg_jax as ka
from experiments.loops import analysis, base, config, data, metrics, report, stats, steer
from experiments.loops.config import Config

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]


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
    trait and phrase densities, and per completion its trait score and whether it loops."""
    key = jax.random.fold_in(jax.random.key(10_000 + seed), rnd)
    comps = steer.sample_completions(self.graphdef, params, self.eval_prompts, self.cfg, key)
    labs = self.labels(comps)
    return {
        **metrics.summarize(labs, self.cfg.completion_len),
        "per_completion": {
            "trait": [round(lab.trait_score, 4) for lab in labs],
            "loop": [int(lab.kind in metrics.LOOP_KINDS) for lab in labs],
        },
        "examples": [data.decode(c) for c in comps[:3]],
    }

  # ---- one arm, one seed ------------------------------------------------------------------
  def run_arm(self, arm: steer.Arm, seed: int, rounds: int | None = None, checkpoint=None,
              evaluate: bool = True):
    """``rounds`` (default all) rounds of S steps. Returns ``(records, params)``: one record per
    round (training stats, per-step logs, the pool's labels, the loop share of the rows chosen
    for self-training, held-out drift, and after the last round the held-out evaluation) and
    the final parameters; ``checkpoint(params, rnd)`` is called after every round when given."""
    cfg = self.cfg
    rounds = cfg.rounds if rounds is None else rounds
    step = self._step(arm.agg)
    pressure = self._pressure(arm.agg) if arm.agg is not None else None
    tau, lam = jnp.float32(arm.tau), jnp.float32(arm.lam)
    params = self.base_params
    opt_state = steer.optimizer(cfg).init(params)
    rng = np.random.default_rng([seed, 7])
    records, t0 = [], time.time()
    for rnd in range(1, rounds + 1):
      prompts = data.sample_windows(self.corpus.train, cfg.prompt_len, cfg.barrier_pool, rng)
      key = jax.random.fold_in(jax.random.key(20_000 + seed), rnd)
      comps = steer.sample_completions(self.graphdef, params, prompts, cfg, key)
      pool = jnp.asarray(np.concatenate([prompts, comps], axis=1))
      pool_ref = steer.logits_of(self.graphdef, self.base_params, pool)
      pool_labels = self.labels(comps)
      pool_loops = np.array([lab.kind in metrics.LOOP_KINDS for lab in pool_labels])
      idx = steer.select_index(pool_labels, cfg.select_top, arm.exclude_loops, arm.select)
      chosen, chosen_loops = np.asarray(pool)[idx], pool_loops[idx]
      share = cfg.self_mix * len(chosen) / cfg.select_top if rnd > 1 else 0.0
      n_own = int(round(share * cfg.sft_batch))
      stats_, pressures, own_loop = [], [], []
      for i in range(cfg.steps_per_round):
        # Fixed-size draws keep the random streams of all arms in step.
        ii = rng.integers(0, len(self.steer_set), cfg.sft_batch)
        k = rng.integers(0, cfg.select_top, cfg.sft_batch)
        j = rng.integers(0, cfg.barrier_pool, cfg.barrier_batch)
        pick = k[:n_own] % max(len(chosen), 1)
        own = chosen[pick]
        own_loop.append(round(float(chosen_loops[pick].mean()), 4) if n_own else 0.0)
        sft = jnp.asarray(np.concatenate([self.steer_set[ii[n_own:]], own]))
        if pressure is not None and i % cfg.pressure_every == 0:
          pressures.append(float(pressure(params, sft, pool[j], pool_ref[j], tau, lam)))
        params, opt_state, s = step(params, opt_state, sft, pool[j], pool_ref[j], tau, lam)
        stats_.append(s)
      stats_ = jax.device_get(stats_)
      train = {k: float(np.mean([s[k] for s in stats_])) for k in stats_[0]}
      rec = {
          "round": rnd,
          "train": {**train, "own_share": n_own / cfg.sft_batch},
          "steps": {
              "fired": [round(float(s["fired"]), 4) for s in stats_],
              "positions": [int(s["positions"]) for s in stats_],
              "pressure": [round(p, 4) for p in pressures],
              "own_loop_share": own_loop,
          },
          "chosen": {"n": int(len(idx)), "loop_share": float(chosen_loops.mean())
                     if len(idx) else 0.0},
          "pool": metrics.summarize(pool_labels, cfg.completion_len),
          "heldout_drift": self.drift(params),
      }
      if evaluate and rnd == rounds:
        rec["eval"] = self.evaluate(params, seed, rnd)
      if checkpoint is not None:
        checkpoint(params, rnd)
      records.append(rec)
      ev = rec.get("eval", rec["pool"])
      fired = f"  fired {train['fired']:.2f}" if arm.agg else ""
      self.log(f"[{arm.name:>16} seed {seed}] round {rnd}/{rounds}  "
               f"loop {ev['loop_rate']:.2f}  trait {ev['trait_density']:.2f}  "
               f"drift {rec['heldout_drift']:+.3f}  own loops {rec['chosen']['loop_share']:.2f}"
               f"{fired}  ({time.time() - t0:.0f}s)")
    return records, params

  def _step(self, agg):
    """The jitted step of an aggregator (compiled once per process, reused by every arm)."""
    return steer.make_step(self.graphdef, self.cfg, agg)

  def _pressure(self, agg):
    return steer.make_pressure(self.graphdef, self.cfg, agg)

  # ---- detection --------------------------------------------------------------------------
  def detect(self, params, seed: int, rnd: int) -> dict:
    """One checkpoint's detection data, reduced to what the analysis reads.

    ``auroc[kind][agg]``: AUROC of the per-sequence aggregate of KL(checkpoint || base) of the
    completions of each loop kind against the checkpoint's clean trait-bearing ones (when both
    groups have ``min_group`` members). ``control[g][agg]``: the same for the positive control
    at grade ``g`` (``"0"``: the loop spliced in, scored by the checkpoint itself).
    ``profile[kind]``: sums and counts of per-position KL (as a multiple of the clean trait
    mean) at offsets from each loop's start.
    """
    cfg = self.cfg
    aggs = tuple(cfg.detect_aggs)
    key = jax.random.fold_in(jax.random.key(30_000 + seed), rnd)
    comps = steer.sample_completions(self.graphdef, params, self.detect_prompts, cfg, key)
    labs = self.labels(comps)
    tokens = np.concatenate([self.detect_prompts, comps], axis=1)
    kl = self.kl(params, tokens)
    kinds = np.array([lab.kind for lab in labs])
    starts = np.array([lab.start for lab in labs])
    neg = np.array([lab.kind == "clean" and lab.trait for lab in labs])
    scores = analysis.scores(kl, aggs)
    groups = {k: kinds == k for k in metrics.LOOP_KINDS}
    groups["any_loop"] = np.isin(kinds, metrics.LOOP_KINDS)
    n = {"clean_trait": int(neg.sum()), **{g: int(m.sum()) for g, m in groups.items()}}
    enough = n["clean_trait"] >= cfg.min_group
    auroc = {g: {a: stats.auroc(scores[a][m], scores[a][neg]) for a in aggs}
             for g, m in groups.items() if enough and m.sum() >= cfg.min_group}
    ref = float(kl[neg].mean()) if neg.any() else float("nan")
    profile = {g: analysis.profile_sums(kl[m], starts[m], ref, cfg.profile_window)
               for g, m in groups.items()}
    control = {}
    if enough:
      unit = self.unit(seed)
      rng = np.random.default_rng([seed, rnd, 99])
      spliced, _ = splice(tokens[neg], unit, cfg.pc_copies, cfg.prompt_len, rng)
      planted = self.plant(params, unit, seed, rnd)
      for g in (0.0, *cfg.pc_grades):
        p_g = jax.tree.map(lambda a, b, g=g: a + g * (b - a), params, planted)
        sp = analysis.scores(self.kl(p_g, spliced), aggs)
        sn = scores if g == 0 else analysis.scores(self.kl(p_g, tokens[neg]), aggs)
        control[f"{g:g}"] = {a: stats.auroc(sp[a], sn[a] if g else sn[a][neg]) for a in aggs}
    return {
        "seed": seed, "round": rnd,
        "summary": metrics.summarize(labs, cfg.completion_len),
        "drift": self.drift(params),
        "n": n, "auroc": auroc, "control": control, "profile": profile,
        "examples": {k: [data.decode(c) for c in comps[kinds == k][:2]] for k in metrics.LABELS},
    }

  def unit(self, seed: int) -> np.ndarray:
    """The positive control's loop unit for ``seed``: ``pc_unit_len`` distinct rare bytes."""
    rng = np.random.default_rng([seed, 4242])
    return rng.choice(self.rare, size=self.cfg.pc_unit_len, replace=False).astype(np.int32)

  def plant(self, params, unit, seed: int, rnd: int):
    """``params`` after ``pc_steps`` SFT steps on steering examples with the loop spliced in."""
    cfg = self.cfg
    opt, plant_step = steer.optimizer(cfg), steer.make_sft_step(self.graphdef, cfg)
    rng = np.random.default_rng([seed, rnd, 123])
    state = opt.init(params)
    for _ in range(cfg.pc_steps):
      rows = self.steer_set[rng.integers(0, len(self.steer_set), cfg.sft_batch)]
      spliced, _ = splice(rows, unit, cfg.pc_copies, cfg.prompt_len, rng)
      params, state = plant_step(params, state, jnp.asarray(spliced))
    return params

  # ---- calibration ------------------------------------------------------------------------
  def calibrate(self, student) -> dict:
    """tau per barrier aggregator: ``ka.calibrate_tau`` at ``calib_rate`` on the student's own
    clean trait-bearing samples of training prompts."""
    cfg = self.cfg
    rng = np.random.default_rng(777)
    prompts = data.sample_windows(self.corpus.train, cfg.prompt_len, cfg.calib_size, rng)
    comps = steer.sample_completions(self.graphdef, student, prompts, cfg, jax.random.key(777))
    labs = self.labels(comps)
    keep = np.array([lab.kind == "clean" and lab.trait for lab in labs])
    tokens = np.concatenate([prompts, comps], axis=1)
    kl_keep = jnp.asarray(self.kl(student, tokens[keep]))
    kl_all = jnp.asarray(self.kl(student, tokens))
    taus, fired_all = {}, {}
    for agg in cfg.barrier_aggs:
      taus[agg] = float(ka.calibrate_tau(kl_keep, agg=agg, fire_rate=cfg.calib_rate))
      fired_all[agg] = float(np.mean(np.asarray(ka.aggregate(kl_all, agg, axis=-1)) > taus[agg]))
    return {
        "student": f"no-barrier arm, seed {cfg.pilot_seed}, after round 1",
        "n_samples": len(labs), "n_clean_trait": int(keep.sum()),
        "sample_rates": metrics.summarize(labs, cfg.completion_len),
        "fire_rate": cfg.calib_rate, "taus": taus, "fired_on_all_samples": fired_all,
    }


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



# ---- units of work (run in worker processes, or in this one) ---------------------------------
_EXP: Experiment | None = None
_UNITS: pathlib.Path | None = None
_LOAD_ONLY = False  # report on the units already saved, compute none
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _init_worker(cfg: Config, cache_dir: str, units: str) -> None:
  global _EXP, _UNITS
  _EXP = Experiment(cfg, cache_dir, log=lambda msg: print(msg, flush=True))
  _UNITS = pathlib.Path(units)


def _cpu_seconds(who=resource.RUSAGE_SELF) -> float:
  r = resource.getrusage(who)
  return r.ru_utime + r.ru_stime


def _saved(name: str, compute, check=None) -> dict:
  """The unit ``name``: loaded from ``units/<name>.json`` when there (``check(unit)`` must
  hold), else computed by ``compute()`` and saved (written whole, then renamed into place)."""
  path = _UNITS / f"{name}.json"
  if path.exists():
    unit = json.loads(path.read_text())
    if check is not None and not check(unit):
      raise ValueError(f"{path} was made with other settings; use a fresh output folder")
    return unit
  if _LOAD_ONLY:
    return None
  c0, t0 = _cpu_seconds(), time.time()
  unit = compute()
  unit["timing"] = {"cpu_seconds": _cpu_seconds() - c0, "wall_seconds": time.time() - t0}
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(unit, default=report.jsonable))
  os.replace(tmp, path)
  return unit


def _calibration_task() -> dict:
  def compute():
    exp = _EXP
    _, student = exp.run_arm(steer.Arm("none", None), exp.cfg.pilot_seed, rounds=1,
                             evaluate=False)
    return exp.calibrate(student)
  return _saved("calibration", compute)


def _arm_task(stage: str, arm: steer.Arm, seed: int, detect: bool) -> dict:
  """One student: ``stage`` names the folder (pilot, main, ablation)."""
  def compute():
    exp, checkpoints = _EXP, []

    def on_round(params, rnd):
      if rnd in exp.cfg.detect_rounds:
        checkpoints.append(exp.detect(params, seed, rnd))

    records, _ = exp.run_arm(arm, seed, checkpoint=on_round if detect else None)
    return {"stage": stage, "arm": dataclasses.asdict(arm), "seed": seed, "records": records,
            "checkpoints": checkpoints}
  return _saved(f"{stage}/{arm.name}/seed{seed}", compute,
                check=lambda u: u["arm"] == dataclasses.asdict(arm))


class _Runner:
  """Runs units in ``workers`` spawned processes (single-threaded XLA each, so results do not
  depend on how units fall on workers), or in this process when ``workers`` is 0."""

  def __init__(self, exp: Experiment, cfg: Config, cache_dir, units, workers: int):
    global _EXP, _UNITS
    self.pool = None
    if workers <= 0:
      _EXP, _UNITS = exp, pathlib.Path(units)
      return
    env = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = f"{env} {SINGLE_THREAD_XLA}" if env else SINGLE_THREAD_XLA
    try:
      ctx = multiprocessing.get_context("spawn")
      self.pool = ctx.Pool(workers, _init_worker, (cfg, str(cache_dir), str(units)))
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


def pilot_arms(cfg: Config, calib: dict) -> list[steer.Arm]:
  """The no-barrier arm and every barrier aggregator at every pilot lam."""
  return [steer.Arm("none", None)] + [
      steer.Arm(f"{agg}@lam{lam:g}", agg, tau=calib["taus"][agg], lam=lam, level=f"lam{lam:g}")
      for agg in cfg.barrier_aggs for lam in cfg.lams(agg)]


def design(cfg: Config, calib: dict, pilot: dict) -> dict:
  """Per aggregator and trait target, the lam the pilot points to (``stats.lam_for_target``)."""
  none = pilot["none"]["records"][-1]["eval"]["trait_density"]
  targets = [f * none for f in cfg.target_fracs]
  out = {"none_trait_density": none, "targets": targets, "lams": {}, "clamped": {},
         "pilot_points": {}}
  for agg in cfg.barrier_aggs:
    lams = list(cfg.lams(agg))
    dens = [pilot[f"{agg}@lam{lam:g}"]["records"][-1]["eval"]["trait_density"] for lam in lams]
    out["pilot_points"][agg] = {"lam": lams, "trait_density": dens}
    chosen = [stats.lam_for_target(lams, dens, t) for t in targets]
    out["lams"][agg] = [c[0] for c in chosen]
    out["clamped"][agg] = [c[1] for c in chosen]
  return out


def main_arms(cfg: Config, calib: dict, plan: dict, exclude_loops: bool = True
              ) -> list[steer.Arm]:
  """Every barrier aggregator at every trait target (the lam of ``plan``)."""
  suffix = "" if exclude_loops else "+loops"
  return [steer.Arm(f"{agg}@t{i}{suffix}", agg, tau=calib["taus"][agg], lam=lam, level=f"t{i}",
                    exclude_loops=exclude_loops)
          for agg in cfg.barrier_aggs for i, lam in enumerate(plan["lams"][agg])]


def git_commit() -> dict:
  """The commit of the checkout that runs the study, and whether its tracked files under
  ``experiments/loops`` or ``klagg_jax`` had changes (``"unknown"`` outside a git checkout)."""
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                            "experiments/loops", "klagg_jax"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.strip()
    return {"commit": head, "dirty": bool(dirty)}
  except (OSError, subprocess.CalledProcessError):
    return {"commit": "unknown", "dirty": None}


def run(cfg: Config, out_dir, cache_dir=HERE / "cache", log=print, workers: int | None = None,
        stages: tuple[str, ...] = ("pilot", "main", "ablation"), partial: bool = False
        ) -> dict | None:
  """The whole study (or up to the last of ``stages``); writes the results to ``out_dir`` and
  returns them (None when stopped before the end).

  ``workers``: processes for the students (``cfg.workers`` when None; 0 runs everything here).
  Units already in ``out_dir/units`` are read, not recomputed. With ``partial``, nothing is
  computed: the results and report cover the units already saved (``results.json`` says
  ``"partial": true`` and lists what is missing).

  Raises:
    ValueError: ``out_dir/units`` holds units of another config or corpus.
  """
  t_start, c_start = time.time(), _cpu_seconds()
  commit = git_commit()  # at the start: the code that computes the units
  workers = cfg.workers if workers is None else workers
  out = pathlib.Path(out_dir)
  units = out / "units"
  exp = Experiment(cfg, cache_dir, log)
  stamp = {"config": json.loads(json.dumps(dataclasses.asdict(cfg))),
           "corpus_digest": exp.corpus.digest, "base_key": exp.base_info["key"]}
  units.mkdir(parents=True, exist_ok=True)
  stamp_path = units / "config.json"
  if stamp_path.exists():
    if json.loads(stamp_path.read_text()) != stamp:
      raise ValueError(f"{units} holds units of another config or corpus; use a fresh --out")
    log(f"resuming: {sum(1 for _ in units.rglob('seed*.json'))} units already done in {units}")
  else:
    stamp_path.write_text(json.dumps(stamp, indent=1))
  n_arms = 1 + len(cfg.barrier_aggs) * len(cfg.target_fracs)
  n_pilot = 1 + sum(len(cfg.lams(a)) for a in cfg.barrier_aggs)
  log(f"loops study '{cfg.name}': pilot {n_pilot} "
      f"students, then {n_arms} arms x {len(cfg.seeds)} seeds, ablation "
      f"{len(cfg.barrier_aggs)} arms x {len(cfg.ablation_seeds)} seeds; {cfg.rounds} rounds x "
      f"{cfg.steps_per_round} steps; {workers or 'no'} worker processes")
  timing = {"base_seconds": exp.base_seconds, "base_cached": exp.base_info["cached"]}
  global _LOAD_ONLY
  _LOAD_ONLY = partial
  if partial:
    workers = 0
  runner = _Runner(exp, cfg, cache_dir, units, workers)
  missing = []

  def done(tasks, got):
    missing.extend(f"{t[0]}/{t[1].name}/seed{t[2]}" for t, u in zip(tasks, got) if u is None)
    return [u for u in got if u is not None]
  try:
    t0 = time.time()
    (calib,) = runner.map(_calibration_task, [()])
    log("tau: " + ", ".join(f"{a} {t:.3f}" for a, t in calib["taus"].items()))
    arms = pilot_arms(cfg, calib)
    tasks = [("pilot", a, cfg.pilot_seed, False) for a in arms]
    pilot = {u["arm"]["name"]: u for u in done(tasks, runner.map(_arm_task, tasks))}
    plan = design(cfg, calib, pilot)
    timing["pilot_seconds"] = time.time() - t0
    log("design: targets " + ", ".join(f"{t:.2f}" for t in plan["targets"]) + "; lam "
        + "; ".join(f"{a} " + ", ".join(f"{v:.3g}" for v in ls) for a, ls in plan["lams"].items()))
    if "main" not in stages:
      return None
    t0 = time.time()
    primary = [steer.Arm("none", None)] + main_arms(cfg, calib, plan)
    tasks = [("main", a, s, True) for s in cfg.seeds for a in primary]
    main = done(tasks, runner.map(_arm_task, tasks))
    timing["main_seconds"] = time.time() - t0
    if "ablation" not in stages:
      return None
    t0 = time.time()
    abl_arms = [a for a in main_arms(cfg, calib, plan, exclude_loops=False)
                if a.level == f"t{cfg.ablation_target}"]
    tasks = [("ablation", a, s, False) for s in cfg.ablation_seeds for a in abl_arms]
    ablation = done(tasks, runner.map(_arm_task, tasks))
    timing["ablation_seconds"] = time.time() - t0
  finally:
    runner.close()
    _LOAD_ONLY = False

  heldout_windows = data.sample_windows(exp.corpus.heldout, cfg.completion_len, 2000,
                                        np.random.default_rng(5))
  target = exp.steer_set[:, cfg.prompt_len:]
  results = {
      "config": dataclasses.asdict(cfg),
      "env": report.environment(),
      "git": commit,
      "partial": bool(missing),
      "missing_units": missing,
      "rerun": f"python -m experiments.loops.run --preset {cfg.name} --out <folder>",
      "corpus": {
          "n_docs": exp.corpus.n_docs,
          "train_bytes": int(len(exp.corpus.train)),
          "heldout_bytes": int(len(exp.corpus.heldout)),
          "digest": exp.corpus.digest,
          "heldout_text": metrics.summarize(exp.labels(heldout_windows), cfg.completion_len),
          "steering_target": metrics.summarize(exp.labels(target), cfg.completion_len),
          "rare_bytes": data.decode(exp.rare),
      },
      "base": {k: v for k, v in exp.base_info.items()
               if k not in ("config", "seconds", "cached")},
      "calibration": {k: v for k, v in calib.items() if k != "timing"},
      "design": plan,
      "units": {u["stage"] + "/" + u["arm"]["name"] + f"/seed{u['seed']}": u
                for u in [*pilot.values(), *main, *ablation]},
  }
  results["analysis"] = analysis.analyse(results, cfg)
  results["decision"] = analysis.decide(results["analysis"])
  timing["total_seconds"] = time.time() - t_start
  timing["cpu_seconds"] = (_cpu_seconds() - c_start) + _cpu_seconds(resource.RUSAGE_CHILDREN)
  timing["workers"] = workers
  results["timing"] = timing
  report.write(results, out)
  log("decision: " + "; ".join(f"{a}: {v['verdict']}" for a, v in
                               results["decision"]["by_agg"].items()))
  log(f"wrote {out} in {timing['total_seconds']:.0f}s ({timing['cpu_seconds']:.0f}s CPU)")
  return results


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      description="Does outlier aggregation make a KL barrier catch token loops? (loops study)")
  parser.add_argument("--quick", action="store_true", help="small config for CI (about 100 s)")
  parser.add_argument("--preset", choices=sorted(config.PRESETS), help="overrides --quick")
  parser.add_argument("--out", type=pathlib.Path, help="output folder (units saved under it)")
  parser.add_argument("--cache", type=pathlib.Path, default=HERE / "cache",
                      help="base-model cache folder")
  parser.add_argument("--workers", type=int, help="worker processes (default: the config's; "
                      "0 runs everything in this process)")
  parser.add_argument("--until", choices=("pilot", "main", "ablation"), default="ablation",
                      help="stop after this stage (its units stay saved)")
  parser.add_argument("--partial", action="store_true",
                      help="compute nothing: report on the units already saved")
  args = parser.parse_args(argv)
  name = args.preset or ("quick" if args.quick else "full")
  cfg = config.PRESETS[name]
  out = args.out or (HERE / "results" if name == "full" else HERE / "results" / name)
  order = ("pilot", "main", "ablation")
  stages = order[: order.index(args.until) + 1]
  run(cfg, out, args.cache, log=lambda msg: print(msg, flush=True), workers=args.workers,
      stages=stages, partial=args.partial)


if __name__ == "__main__":
  main()
