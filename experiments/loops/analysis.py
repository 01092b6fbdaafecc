"""Analysis of the study's raw records: detection AUROC, KL profiles, dose-response, decision.

Everything here is host-side numpy over what ``run.py`` collected, plus ``ka.aggregate`` to
score each completion the way a per-sequence barrier would.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import klagg_jax as ka
from experiments.loops import decision, stats

DETECT_KINDS: tuple[str, ...] = ("phrase_loop", "other_loop", "near_loop", "any_loop",
                                 "spliced", "planted")
"""Positive groups of the detection study: three kinds of real loop, their union, and the
positive control (spliced into the checkpoint's clean completions; planted in the student)."""

CLOSED_LOOP_KEYS: tuple[str, ...] = (
    "loop_rate", "phrase_loop_rate", "other_loop_rate", "near_loop_rate", "exact_loop_rate",
    "phrase_density", "trait_rate", "clean_trait_rate")


@functools.lru_cache(maxsize=None)
def _scorer(aggs: tuple[str, ...]):
  @jax.jit
  def f(kl, where):
    return jnp.stack([ka.aggregate(kl, a, where=where, axis=-1) for a in aggs])

  return f


def _scores(kl: np.ndarray, aggs: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Per-sequence aggregate ``{agg: [n]}`` of per-position KL ``[n, C]`` (every position
  valid), as ``ka.aggregate`` computes it for a per-sequence barrier. Rows are padded to a
  multiple of 64 (padding masked out) so a few shapes compile once."""
  n = len(kl)
  if not n:
    return {a: np.zeros(0) for a in aggs}
  rows = -(-n // 64) * 64
  padded = np.zeros((rows, kl.shape[1]), np.float32)
  padded[:n] = kl
  where = np.zeros(padded.shape, bool)
  where[:n] = True
  out = np.asarray(_scorer(tuple(aggs))(padded, where))[:, :n]
  return dict(zip(aggs, out))


def detection(checkpoints: list[dict], cfg) -> dict:
  """AUROC per checkpoint, aggregator and positive group, its checkpoint-blocked bootstrap
  summary, the difference to mean's, and the per-position KL profile aligned at loop starts;
  over all checkpoints, and (``by_rule``) over those of each self-training rule."""
  rng = np.random.default_rng(0)
  aggs = list(cfg.detect_aggs)
  rows = []
  for ck in checkpoints:
    groups = ck["_groups"]
    scores = {g: _scores(kl, tuple(aggs)) for g, (kl, _, _) in groups.items()}
    row = {"seed": ck["seed"], "round": ck["round"], "rule": ck.get("rule", "min3"),
           "drift": ck["drift"],
           "summary": ck["summary"], "info": ck["info"], "examples": ck["examples"],
           "n": {g: int(len(v[0])) for g, v in groups.items()}, "auroc": {}, "median": {}}
    for g in groups:
      row["median"][g] = {a: float(np.median(scores[g][a])) if len(scores[g][a]) else None
                          for a in aggs}
    for kind in DETECT_KINDS:
      if kind not in groups:
        continue
      neg = groups[kind][2]
      if len(groups[kind][0]) < cfg.min_group or len(groups[neg][0]) < cfg.min_group:
        continue
      row["auroc"][kind] = {a: stats.auroc(scores[kind][a], scores[neg][a]) for a in aggs}
    rows.append(row)

  out = _auroc_tables(rows, aggs, cfg, rng)
  out["by_rule"] = {}
  for rule in sorted({r["rule"] for r in rows}):
    sub = [r for r in rows if r["rule"] == rule]
    out["by_rule"][rule] = {**_auroc_tables(sub, aggs, cfg, rng),
                            "profiles": profiles([c for c in checkpoints if c["rule"] == rule],
                                                 cfg)}
  out["checkpoints"] = rows
  out["profiles"] = profiles(checkpoints, cfg)
  return out


def _auroc_tables(rows: list[dict], aggs: list[str], cfg, rng) -> dict:
  """Per group and aggregator: the mean of the per-checkpoint AUROCs with its checkpoint-blocked
  bootstrap interval, and the same for the difference to mean's AUROC."""
  table, diff = {}, {}
  for kind in DETECT_KINDS:
    used = [r for r in rows if kind in r["auroc"]]
    table[kind], diff[kind] = {}, {}
    for a in aggs:
      vals = [r["auroc"][kind][a] for r in used]
      m, lo, hi = stats.block_bootstrap_mean(vals, cfg.n_boot, rng, decision.LEVEL)
      table[kind][a] = {"mean": m, "lo": lo, "hi": hi, "n_checkpoints": len(used),
                        "n_positive": int(sum(r["n"][kind] for r in used))}
      d = [r["auroc"][kind][a] - r["auroc"][kind]["mean"] for r in used]
      diff[kind][a] = list(stats.block_bootstrap_mean(d, cfg.n_boot, rng, decision.LEVEL))
  return {"auroc": table, "diff_vs_mean": diff}


def profiles(checkpoints: list[dict], cfg) -> dict:
  """Per-position KL aligned at each loop's start, as a multiple of the mean per-position KL of
  the same checkpoint's clean trait completions (scored by the same student), averaged over
  every loop of a kind in every checkpoint. Offsets with fewer than 5 loops are NaN."""
  lo, hi = cfg.profile_window
  offsets = np.arange(lo, hi)
  out = {}
  for kind in DETECT_KINDS:
    total = np.zeros(len(offsets))
    raw = np.zeros(len(offsets))
    count = np.zeros(len(offsets), int)
    for ck in checkpoints:
      groups = ck["_groups"]
      if kind not in groups or not len(groups[kind][0]) or kind not in DETECT_KINDS:
        continue
      kl, starts, neg = groups[kind]
      ref = float(np.mean(groups[neg][0])) if len(groups[neg][0]) else float("nan")
      if not ref > 0:
        continue
      for row, s in zip(kl, starts):
        if s < 0:
          continue
        pos = s + offsets
        ok = (pos >= 0) & (pos < kl.shape[1])
        total[ok] += row[pos[ok]] / ref
        raw[ok] += row[pos[ok]]
        count[ok] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
      ratio = np.where(count >= 5, total / np.maximum(count, 1), np.nan)
      mean_kl = np.where(count >= 5, raw / np.maximum(count, 1), np.nan)
    out[kind] = {"offsets": offsets.tolist(), "ratio": ratio.tolist(),
                 "kl": mean_kl.tolist(), "count": count.tolist()}
  return out


def _final(results: dict, arm: str) -> dict:
  """``{seed: final-round record}`` of an arm."""
  return {int(s): recs[-1] for s, recs in results["runs"][arm].items()}


def _level_arms(results: dict, agg: str) -> list[str]:
  return [a for a, info in results["arms"].items() if info["agg"] == agg]


def closed_loop(results: dict, cfg) -> dict:
  """Final-round outcome per arm (seed mean, min, max), logged pressure and fire rate, and the
  seed-paired loop-rate difference of each tail aggregate to mean at matched trait."""
  arms = {}
  for arm, by_seed in results["runs"].items():
    finals = _final(results, arm)
    per_seed = {}
    for s, rec in finals.items():
      ev = rec["eval"]
      row = {k: ev[k] for k in CLOSED_LOOP_KEYS}
      row["drift"] = rec["heldout_drift"]
      recs = by_seed[str(s)] if str(s) in by_seed else by_seed[s]
      if arm in results["arms"]:  # a barrier arm
        p1 = recs[0]["steps"]["pressure"]
        p_all = [p for r in recs for p in r["steps"]["pressure"]]
        fired = [f for r in recs[1:] for f in r["steps"]["fired"]]
        pos = [p / max(f * cfg.barrier_batch, 1e-9) for r in recs
               for f, p in zip(r["steps"]["fired"], r["steps"]["positions"]) if f > 0]
        row.update(pressure_round1=float(np.median(p1)) if p1 else float("nan"),
                   pressure_median=float(np.median(p_all)) if p_all else float("nan"),
                   pressure_p90=float(np.quantile(p_all, 0.9)) if p_all else float("nan"),
                   fired_mean=float(np.mean(fired)) if fired else float("nan"),
                   positions_per_fired=float(np.mean(pos)) if pos else float("nan"))
      per_seed[s] = row
    keys = list(next(iter(per_seed.values())))
    arms[arm] = {
        "per_seed": {str(s): r for s, r in per_seed.items()},
        "mean": {k: float(np.mean([r[k] for r in per_seed.values()])) for k in keys},
        "min": {k: float(np.min([r[k] for r in per_seed.values()])) for k in keys},
        "max": {k: float(np.max([r[k] for r in per_seed.values()])) for k in keys},
    }
  return {"arms": arms, "matched": matched_trait(results, cfg)}


def _point(rec: dict, idx, length: int) -> tuple[float, float]:
  """(phrase density, loop rate) of a final-round evaluation over the prompts ``idx``."""
  pc = rec["eval"]["per_completion"]
  counts, loops = np.asarray(pc["phrase_count"]), np.asarray(pc["loop"])
  return float(counts[idx].mean() * 64 / length), float(loops[idx].mean())


def matched_trait(results: dict, cfg) -> dict:
  """For each tail aggregate: the seed-paired difference (tail - mean) in loop rate at matched
  phrase density, with a bootstrap interval over prompts (paired across arms) and seeds."""
  out = {}
  mean_arms = _level_arms(results, "mean")
  if not mean_arms:
    return out
  seeds = [int(s) for s in results["runs"][mean_arms[0]]]
  n_eval = len(_final(results, mean_arms[0])[seeds[0]]["eval"]["per_completion"]["loop"])
  length = cfg.completion_len
  rng = np.random.default_rng(1)
  finals = {a: _final(results, a) for a in results["runs"]}

  def delta(tail_arms, seed, idx):
    pa = np.array([_point(finals[a][seed], idx, length) for a in tail_arms])
    pb = np.array([_point(finals[a][seed], idx, length) for a in mean_arms])
    return stats.matched_difference(pa[:, 0], pa[:, 1], pb[:, 0], pb[:, 1])

  full = np.arange(n_eval)
  for tail in decision.TAIL_AGGS:
    tail_arms = _level_arms(results, tail)
    if not tail_arms:
      continue
    per_seed = {s: delta(tail_arms, s, full) for s in seeds}
    vals = np.array(list(per_seed.values()))
    est = float(np.nanmean(vals)) if np.any(~np.isnan(vals)) else float("nan")
    boots = []
    for _ in range(cfg.n_boot):
      idx = rng.integers(0, n_eval, n_eval)
      pick = rng.choice(seeds, size=len(seeds), replace=True)
      d = [delta(tail_arms, s, idx) for s in pick]
      if np.any(~np.isnan(d)):
        boots.append(np.nanmean(d))
    if boots:
      lo, hi = np.quantile(boots, [(1 - decision.LEVEL) / 2, (1 + decision.LEVEL) / 2])
    else:
      lo = hi = float("nan")
    out[tail] = {"estimate": est, "lo": float(lo), "hi": float(hi),
                 "per_seed": {str(s): v for s, v in per_seed.items()},
                 "n_boot_used": len(boots)}
  return out


def decide(results: dict) -> dict:
  """The verdict of ``decision.verdict`` for every tail aggregate, with the numbers it read."""
  det, cl = results["detection"], results["closed_loop"]
  pc_agg, pc_kind = decision.POSITIVE_CONTROL_AGG, decision.POSITIVE_CONTROL_KIND
  pc = det["auroc"].get(pc_kind, {}).get(pc_agg, {})
  pc_diff = det["diff_vs_mean"].get(pc_kind, {}).get(pc_agg)
  control_ok = bool(pc and pc.get("n_checkpoints", 0) > 0
                    and pc["mean"] >= decision.POSITIVE_CONTROL_MIN_AUROC
                    and pc_diff is not None and pc_diff[1] > 0)
  by_agg = {}
  for tail in decision.TAIL_AGGS:
    m = cl["matched"].get(tail)
    loop_diff = None if m is None else (m["estimate"], m["lo"], m["hi"])
    auroc_diff = det["diff_vs_mean"].get(decision.DETECT_KIND, {}).get(tail)
    by_agg[tail] = {"loop_diff": loop_diff, "auroc_diff": auroc_diff,
                    "verdict": decision.verdict(loop_diff, auroc_diff, control_ok)}
  return {"rule": decision.RULE_TEXT, "positive_control": {
      "kind": pc_kind, "agg": pc_agg, "auroc": pc, "diff_vs_mean": pc_diff,
      "min_auroc": decision.POSITIVE_CONTROL_MIN_AUROC, "passed": control_ok},
      "by_agg": by_agg}
