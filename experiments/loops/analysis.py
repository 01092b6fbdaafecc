"""Analysis of the study's units: closed loop at matched trait, ablation, detection, control.

Every interval treats the seed (one whole student per arm) as the unit: per-seed values first
(a checkpoint's AUROC is averaged within its seed), then ``stats.t_interval`` over seeds, or
``stats.welch_interval`` between two arms run on different seeds. Everything is host-side numpy
over what ``run.py`` saved, plus ``ka.aggregate`` to score each completion the way a
per-sequence barrier would.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import klagg_jax as ka
from experiments.loops import decision, stats

LOOP_GROUPS: tuple[str, ...] = ("any_loop", "phrase_loop", "other_loop", "near_loop")
"""Positive groups of the detection study (against clean trait-bearing completions)."""

OUTCOMES: tuple[str, ...] = (
    "loop_rate", "phrase_loop_rate", "other_loop_rate", "near_loop_rate", "trait_density",
    "phrase_density", "clean_trait_rate")

DETECT_SETS: tuple[str, ...] = ("low_drift_barrier", "no_barrier", "all")
"""Checkpoint sets of the detection study: barrier arms' checkpoints whose held-out loss rose at
most ``max_drift``; the no-barrier arm's; every checkpoint."""


@functools.lru_cache(maxsize=None)
def _scorer(aggs: tuple[str, ...]):
  @jax.jit
  def f(kl, where):
    return jnp.stack([ka.aggregate(kl, a, where=where, axis=-1) for a in aggs])

  return f


def scores(kl: np.ndarray, aggs: tuple[str, ...]) -> dict[str, np.ndarray]:
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


def profile_sums(kl: np.ndarray, starts: np.ndarray, ref: float, window) -> dict:
  """Sums and counts of ``kl[row, start + offset] / ref`` over the rows (loops), for every
  offset of ``window``: the per-position KL around a loop's start, relative to ``ref``."""
  offsets = np.arange(*window)
  total, count = np.zeros(len(offsets)), np.zeros(len(offsets), int)
  if ref > 0:
    for row, s in zip(kl, starts):
      if s < 0:
        continue
      pos = s + offsets
      ok = (pos >= 0) & (pos < kl.shape[1])
      total[ok] += row[pos[ok]] / ref
      count[ok] += 1
  return {"sum": total.round(4).tolist(), "count": count.tolist()}


def _nanmean(v) -> float:
  v = np.asarray(v, float)
  return float(np.nanmean(v)) if np.any(~np.isnan(v)) else float("nan")


def _units(results: dict, stage: str) -> dict[str, dict[int, dict]]:
  """``{arm name: {seed: unit}}`` of a stage."""
  out: dict[str, dict[int, dict]] = {}
  for u in results["units"].values():
    if u["stage"] == stage:
      out.setdefault(u["arm"]["name"], {})[int(u["seed"])] = u
  return out


def _seed_row(unit: dict, cfg) -> dict:
  """A student's final-round outcomes and its training logs, as one row."""
  recs = unit["records"]
  ev = recs[-1]["eval"]
  row = {k: ev[k] for k in OUTCOMES}
  row["drift"] = recs[-1]["heldout_drift"]
  later = recs[1:]
  row["chosen_loop_share"] = _nanmean([r["chosen"]["loop_share"] for r in later])
  row["own_loop_share"] = _nanmean([s for r in later for s in r["steps"]["own_loop_share"]])
  if unit["arm"]["agg"] is not None:
    p_all = [p for r in recs for p in r["steps"]["pressure"]]
    row["pressure_median"] = float(np.median(p_all)) if p_all else float("nan")
    row["fired_mean"] = _nanmean([f for r in later for f in r["steps"]["fired"]])
  return row


def _arm_table(by_seed: dict[int, dict], cfg) -> dict:
  rows = {s: _seed_row(u, cfg) for s, u in sorted(by_seed.items())}
  keys = list(next(iter(rows.values())))
  return {"per_seed": {str(s): r for s, r in rows.items()},
          "summary": {k: stats.t_interval([r[k] for r in rows.values()], decision.LEVEL)
                      for k in keys},
          "info": next(iter(by_seed.values()))["arm"]}


def closed_loop(results: dict, cfg) -> dict:
  """Per arm of the primary condition: outcomes per seed and their t-intervals; for each tail
  aggregate the matched-trait loop-rate difference to mean (``decision`` says how), and the
  level-by-level differences; each barrier arm's difference to the no-barrier arm."""
  main = _units(results, "main")
  arms = {a: _arm_table(by_seed, cfg) for a, by_seed in main.items()}
  levels = {agg: [a for a, t in arms.items() if t["info"]["agg"] == agg]
            for agg in cfg.barrier_aggs}
  seeds = sorted(set.intersection(*[set(main[a]) for a in main])) if main else []

  def point(arm, s, key):
    return arms[arm]["per_seed"][str(s)][key]

  matched = {}
  for tail in decision.TAIL_AGGS:
    if tail not in levels or "mean" not in levels or not levels[tail]:
      continue
    xa = [_nanmean([point(a, s, decision.TRAIT_METRIC) for s in seeds]) for a in levels[tail]]
    xb = [_nanmean([point(a, s, decision.TRAIT_METRIC) for s in seeds]) for a in levels["mean"]]
    span = stats.common_range(xa, xb)
    per_seed = {}
    if span is not None:
      for s in seeds:
        per_seed[str(s)] = stats.matched_difference(
            [point(a, s, decision.TRAIT_METRIC) for a in levels[tail]],
            [point(a, s, decision.LOOP_METRIC) for a in levels[tail]],
            [point(a, s, decision.TRAIT_METRIC) for a in levels["mean"]],
            [point(a, s, decision.LOOP_METRIC) for a in levels["mean"]], span)
    by_level = {}
    for a_t, a_m in zip(levels[tail], levels["mean"]):
      by_level[f"{a_t} - {a_m}"] = {
          k: {"per_seed": {str(s): point(a_t, s, k) - point(a_m, s, k) for s in seeds},
              **stats.t_interval([point(a_t, s, k) - point(a_m, s, k) for s in seeds],
                                 decision.LEVEL)}
          for k in (decision.LOOP_METRIC, decision.TRAIT_METRIC)}
    matched[tail] = {
        "tail_range": [min(xa), max(xa)], "mean_range": [min(xb), max(xb)], "span": span,
        "per_seed": per_seed,
        **(stats.t_interval(list(per_seed.values()), decision.LEVEL) if per_seed
           else {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}),
        "by_level": by_level}
  versus_none = {}
  if "none" in arms:
    for a, t in arms.items():
      if a == "none":
        continue
      versus_none[a] = {k: stats.t_interval([point(a, s, k) - point("none", s, k)
                                             for s in seeds], decision.LEVEL)
                        for k in (decision.LOOP_METRIC, decision.TRAIT_METRIC, "drift")}
  return {"arms": arms, "seeds": seeds, "matched": matched, "versus_none": versus_none}


def ablation(results: dict, cfg, primary: dict) -> dict:
  """The earlier self-training (loops kept) against the primary arm at the same level: Welch
  intervals over the two independent sets of seeds."""
  out = {}
  for name, by_seed in _units(results, "ablation").items():
    table = _arm_table(by_seed, cfg)
    twin = name.replace("+loops", "")
    comp = {}
    if twin in primary["arms"]:
      p_rows, a_rows = primary["arms"][twin]["per_seed"], table["per_seed"]
      comp = {k: stats.welch_interval([r[k] for r in a_rows.values()],
                                      [r[k] for r in p_rows.values()], decision.LEVEL)
              for k in (decision.LOOP_METRIC, decision.TRAIT_METRIC, "phrase_loop_rate")}
    out[name] = {**table, "versus_primary": comp, "primary_arm": twin}
  return out


def _checkpoints(results: dict) -> list[dict]:
  rows = []
  for u in results["units"].values():
    if u["stage"] != "main":
      continue
    for ck in u["checkpoints"]:
      rows.append({**ck, "arm": u["arm"]["name"], "agg": u["arm"]["agg"]})
  return rows


def _in_set(ck: dict, name: str, cfg) -> bool:
  if name == "low_drift_barrier":
    return ck["agg"] is not None and ck["drift"] <= cfg.max_drift
  if name == "no_barrier":
    return ck["agg"] is None
  return True


def _by_seed(cks: list[dict], value) -> dict[str, float]:
  """Per seed, the mean of ``value(ck)`` over that seed's checkpoints (NaN values skipped)."""
  out: dict[str, list] = {}
  for ck in cks:
    out.setdefault(str(ck["seed"]), []).append(value(ck))
  return {s: _nanmean(v) for s, v in sorted(out.items(), key=lambda kv: int(kv[0]))}


def _seed_table(cks: list[dict], get, aggs) -> dict:
  """Per aggregator: per-seed means of ``get(ck, agg)`` with their t-interval, and the same for
  the difference to mean's."""
  table, diff = {}, {}
  for a in aggs:
    ps = _by_seed(cks, lambda ck, a=a: get(ck, a))
    table[a] = {"per_seed": ps, **stats.t_interval(list(ps.values()), decision.LEVEL)}
    pd = _by_seed(cks, lambda ck, a=a: get(ck, a) - get(ck, "mean"))
    diff[a] = {"per_seed": pd, **stats.t_interval(list(pd.values()), decision.LEVEL)}
  return {"auroc": table, "diff_vs_mean": diff}


def detection(results: dict, cfg) -> dict:
  """For every checkpoint set: per loop group and aggregator, AUROC against clean trait-bearing
  completions averaged within seed, then over seeds; the graded control per grade; the chosen
  grade (the one whose mean AUROC on the low-drift barrier set is nearest ``decision``'s
  target); and the KL profile around loop starts."""
  aggs = list(cfg.detect_aggs)
  cks = _checkpoints(results)
  out = {"checkpoints": [{k: ck[k] for k in ("arm", "seed", "round", "drift", "n", "auroc",
                                             "control", "summary", "examples")} for ck in cks]}
  for name in DETECT_SETS:
    sub = [ck for ck in cks if _in_set(ck, name, cfg)]
    entry = {"n_checkpoints": len(sub), "seeds": sorted({ck["seed"] for ck in sub}),
             "groups": {}, "control": {}, "profiles": {}}
    for g in LOOP_GROUPS:
      used = [ck for ck in sub if g in ck["auroc"]]
      if not used:
        continue
      entry["groups"][g] = {"n_checkpoints": len(used),
                            "n_positive": int(sum(ck["n"][g] for ck in used)),
                            **_seed_table(used, lambda ck, a, g=g: ck["auroc"][g][a], aggs)}
    for grade in [f"{g:g}" for g in (0.0, *cfg.pc_grades)]:
      used = [ck for ck in sub if grade in ck["control"]]
      if used:
        entry["control"][grade] = {
            "n_checkpoints": len(used),
            **_seed_table(used, lambda ck, a, grade=grade: ck["control"][grade][a], aggs)}
    for g in LOOP_GROUPS:
      total = np.sum([ck["profile"][g]["sum"] for ck in sub], axis=0) if sub else None
      count = np.sum([ck["profile"][g]["count"] for ck in sub], axis=0) if sub else None
      if total is None:
        continue
      with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(count >= 5, total / np.maximum(count, 1), np.nan)
      entry["profiles"][g] = {"offsets": list(range(*cfg.profile_window)),
                              "ratio": ratio.tolist(), "count": count.tolist()}
    out[name] = entry
  out["control_grade"] = choose_grade(out[decision.DETECT_SET]["control"])
  return out


def choose_grade(control: dict) -> str | None:
  """The grade whose seed-mean AUROC for mean is nearest ``decision.CONTROL_TARGET`` (mean's
  AUROC only, blind to the tail aggregates); None without any graded checkpoint."""
  best, gap = None, np.inf
  for grade, entry in control.items():
    m = entry["auroc"]["mean"]["mean"]
    if not np.isnan(m) and abs(m - decision.CONTROL_TARGET) < gap:
      best, gap = grade, abs(m - decision.CONTROL_TARGET)
  return best


def pilot(results: dict) -> dict:
  """Final trait density, loop rate and drift of every pilot student."""
  return {name: {k: by_seed[s]["records"][-1]["eval"][k] for k in ("trait_density", "loop_rate")}
          | {"drift": by_seed[s]["records"][-1]["heldout_drift"]}
          for name, by_seed in _units(results, "pilot").items() for s in by_seed}


def analyse(results: dict, cfg) -> dict:
  """Every table the report and the decision read."""
  primary = closed_loop(results, cfg)
  return {"pilot": pilot(results), "closed_loop": primary,
          "ablation": ablation(results, cfg, primary), "detection": detection(results, cfg)}


def decide(an: dict) -> dict:
  """The verdict of ``decision.verdict`` for every tail aggregate, with the numbers it read."""
  det = an["detection"]
  grade = det["control_grade"]
  ctl = det[decision.DETECT_SET]["control"].get(grade) if grade is not None else None
  by_agg = {}
  for tail in decision.TAIL_AGGS:
    m = an["closed_loop"]["matched"].get(tail)
    grp = det[decision.DETECT_SET]["groups"].get(decision.DETECT_KIND)
    auroc_diff = grp["diff_vs_mean"].get(tail) if grp else None
    control = decision.control_check(
        None if ctl is None else ctl["auroc"]["mean"], None if ctl is None else
        ctl["diff_vs_mean"].get(tail))
    closed = decision.closed_loop_reading(m)
    detect = decision.detection_reading(auroc_diff, control)
    by_agg[tail] = {"loop_diff": m and {k: m[k] for k in ("mean", "lo", "hi", "n", "span")},
                    "auroc_diff": auroc_diff and {k: auroc_diff[k]
                                                  for k in ("mean", "lo", "hi", "n")},
                    "control": control, "closed_loop": closed, "detection": detect,
                    "verdict": decision.verdict(closed, detect)}
  return {"rule": decision.RULE_TEXT, "control_grade": grade, "by_agg": by_agg}
