"""Results: the JSON of every number, the markdown tables and the figures.

``python -m experiments.loops.report DIR`` re-renders ``results.md`` and the figures from
``DIR/results.json``, after checking that the corpus this interpreter gathers is the one the
results were made on (its digest).
"""

from __future__ import annotations

import json
import os
import pathlib
import platform

import numpy as np

FIGURES = ("decide.png", "detection.png", "training.png")
AGG_COLORS = {"none": "black", "mean": "tab:blue", "rmse": "tab:orange", "p95": "tab:green",
              "soft_p95": "tab:olive", "cvar95": "tab:red", "max": "tab:purple"}
GROUP_NAMES = {"phrase_loop": "phrase loops", "other_loop": "other loops",
               "near_loop": "near-loops", "any_loop": "any real loop"}
SET_NAMES = {"low_drift_barrier": "barrier arms, low drift", "no_barrier": "no barrier",
             "all": "all checkpoints"}


def environment() -> dict:
  """Versions and machine facts recorded with every run."""
  import flax
  import jax
  import optax
  import scipy

  import klagg_jax

  return {
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": getattr(__import__("jaxlib"), "__version__", "unknown"),
      "flax": flax.__version__,
      "optax": optax.__version__,
      "numpy": np.__version__,
      "scipy": scipy.__version__,
      "klagg_jax": getattr(klagg_jax, "__version__", "unknown"),
      "device": str(jax.devices()[0].device_kind),
      "cpu_count": os.cpu_count(),
  }


def jsonable(x):
  """``json.dumps``'s ``default`` for numpy scalars and arrays."""
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serializable: {type(x)}")


def load(out_dir, check_corpus: bool = True) -> dict:
  """``results.json`` of ``out_dir``.

  Raises:
    ValueError: with ``check_corpus``, when the docstring corpus this interpreter gathers has
      another digest than the one recorded (the corpus changes with the Python version).
  """
  results = json.loads((pathlib.Path(out_dir) / "results.json").read_text())
  if check_corpus:
    from experiments.loops import data

    digest = data.load_corpus().digest
    if digest != results["corpus"]["digest"]:
      raise ValueError(
          f"corpus digest {digest[:12]} != recorded {results['corpus']['digest'][:12]}: these "
          f"results were made with Python {results['env']['python']}, whose standard-library "
          f"docstrings differ from this interpreter's ({platform.python_version()})")
  return results


def _ci(v, fmt="{:.2f}") -> str:
  if not v:
    return "-"
  est, lo, hi = v["mean"], v["lo"], v["hi"]
  if est is None or np.isnan(est):
    return "-"
  if lo is None or np.isnan(lo):
    return fmt.format(est)
  return f"{fmt.format(est)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _f(v, fmt="{:.2f}") -> str:
  return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else fmt.format(v)


def _seeds(ps: dict, fmt="{:+.2f}") -> str:
  return ", ".join(_f(v, fmt) for v in ps.values())


def markdown(results: dict) -> str:
  """The results as markdown tables."""
  cfg, base, corpus, an = results["config"], results["base"], results["corpus"], results["analysis"]
  dec, cal, plan = results["decision"], results["calibration"], results["design"]
  aggs = cfg["detect_aggs"]
  ht, st = corpus["heldout_text"], corpus["steering_target"]
  env, git = results["env"], results["git"]
  lines = [
      f"# Loops study: `{cfg['name']}` config",
      "",
      f"Commit `{git['commit']}`{' (with local changes)' if git['dirty'] else ''}; Python "
      f"{env['python']}, jax {env['jax']}, flax {env['flax']}, optax {env['optax']}, numpy "
      f"{env['numpy']}, scipy {env['scipy']}; corpus digest `{corpus['digest'][:16]}` "
      f"({corpus['n_docs']} docstrings; another Python gives another corpus). Rerun: "
      f"`{results['rerun']}`.",
      "",
      f"Base model: held-out loss {base['heldout_loss']:.3f} nats/byte. Detectors on held-out "
      f"text windows: loop {ht['loop_rate']:.3f}, trait density {ht['trait_density']:.2f} per 64 "
      f"bytes (phrase fragments in ordinary text); on the steering target: loop "
      f"{st['loop_rate']:.3f}, trait density {st['trait_density']:.2f}, phrase density "
      f"{st['phrase_density']:.2f}.",
      "",
  ]
  if results.get("partial"):
    lines += [f"**Partial run**: {len(results['missing_units'])} units missing ("
              + ", ".join(results["missing_units"]) + "). Every table covers the units saved; "
              f"resume with `{results['rerun']}` on the same folder.", ""]
  lines += [
      "## Decision",
      "",
      dec["rule"],
      "",
      "| tail | loop rate at matched trait, tail - mean | closed loop | detection AUROC, tail - "
      "mean (low drift) | control | detection | verdict |",
      "|---|---|---|---|---|---|---|",
  ]
  for tail, v in dec["by_agg"].items():
    c = v["control"]
    lines.append(
        f"| {tail} | {_ci(v['loop_diff'], '{:+.3f}')} | {v['closed_loop']} | "
        f"{_ci(v['auroc_diff'], '{:+.3f}')} | mean AUROC {_f(c['mean_auroc'])}, "
        f"{'passed' if c['passed'] else 'failed'} | {v['detection']} | **{v['verdict']}** |")
  lines += ["", f"Control grade used: {dec['control_grade']}.", ""]

  # ---- calibration and design
  lines += ["## Calibration and pilot", "",
            f"tau at fire rate {cal['fire_rate']} on {cal['student']} ({cal['n_clean_trait']} of "
            f"{cal['n_samples']} samples clean and trait-bearing): "
            + ", ".join(f"{a} {t:.3f}" for a, t in cal["taus"].items())
            + "; fire rate on all samples: "
            + ", ".join(f"{a} {t:.2f}" for a, t in cal["fired_on_all_samples"].items()) + ".", "",
            f"Pilot (seed {cfg['pilot_seed']}): final trait density (loop rate, drift) per lam. "
            f"No barrier: {plan['none_trait_density']:.2f}. Targets "
            + ", ".join(f"{t:.2f}" for t in plan["targets"]) + ".", "",
            "| aggregator | lam: trait density (loop rate, drift) | chosen lams | clamped |",
            "|---|---|---|---|"]
  for agg in cfg["barrier_aggs"]:
    cells = []
    for lam in dict((a, ls) for a, ls in cfg["pilot_lams"])[agg]:
      p = an["pilot"][f"{agg}@lam{lam:g}"]
      cells.append(f"{lam:g}: {p['trait_density']:.2f} ({p['loop_rate']:.2f}, "
                   f"{p['drift']:+.1f})")
    lines.append(f"| {agg} | " + "; ".join(cells) + " | "
                 + ", ".join(f"{v:.3g}" for v in plan["lams"][agg]) + " | "
                 + ", ".join(str(c) for c in plan["clamped"][agg]) + " |")

  # ---- closed loop
  cl = an["closed_loop"]
  lines += ["", "## Closed loop (primary: loops left out of self-training)", "",
            f"Final round ({cfg['rounds']}), {cfg['n_eval']} held-out prompts; mean over seeds "
            f"{cl['seeds']} [95% t-interval over seeds].", "",
            "| arm | lam | loop rate | phrase loop | other | trait density | phrase density | "
            "clean trait | drift | fired | pressure | loop share of own rows |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for arm, t in cl["arms"].items():
    s = t["summary"]
    lines.append(
        f"| {arm} | {_f(t['info']['lam'], '{:.3g}')} | {_ci(s['loop_rate'])} | "
        f"{_f(s['phrase_loop_rate']['mean'])} | {_f(s['other_loop_rate']['mean'])} | "
        f"{_ci(s['trait_density'])} | {_f(s['phrase_density']['mean'])} | "
        f"{_f(s['clean_trait_rate']['mean'])} | {_ci(s['drift'], '{:+.2f}')} | "
        f"{_f(s.get('fired_mean', {}).get('mean'))} | "
        f"{_f(s.get('pressure_median', {}).get('mean'))} | {_f(s['own_loop_share']['mean'])} |")
  lines += ["", "Per seed (loop rate / trait density):", "", "| arm | "
            + " | ".join(f"seed {s}" for s in cl["seeds"]) + " |",
            "|---|" + "---|" * len(cl["seeds"])]
  for arm, t in cl["arms"].items():
    cells = [t["per_seed"].get(str(s)) for s in cl["seeds"]]
    lines.append(f"| {arm} | " + " | ".join(
        "-" if r is None else f"{r['loop_rate']:.3f} / {r['trait_density']:.2f}" for r in cells)
        + " |")
  for tail, m in cl["matched"].items():
    lines += ["", f"**{tail} - mean at matched trait.** Trait ranges of the seed means: {tail} "
              f"{m['tail_range'][0]:.2f}-{m['tail_range'][1]:.2f}, mean "
              f"{m['mean_range'][0]:.2f}-{m['mean_range'][1]:.2f}; common range "
              + (f"{m['span'][0]:.2f}-{m['span'][1]:.2f}" if m["span"] else "none")
              + f". Loop-rate difference {_ci(m, '{:+.3f}')}; per seed "
              f"{_seeds(m['per_seed'], '{:+.3f}')}.", "",
              "| level pair | loop rate diff | per seed | trait density diff | per seed |",
              "|---|---|---|---|---|"]
    for pair, d in m["by_level"].items():
      lo, tr = d["loop_rate"], d["trait_density"]
      lines.append(f"| {pair} | {_ci(lo, '{:+.3f}')} | {_seeds(lo['per_seed'], '{:+.3f}')} | "
                   f"{_ci(tr, '{:+.2f}')} | {_seeds(tr['per_seed'])} |")
  if cl["versus_none"]:
    lines += ["", "Each barrier arm minus the no-barrier arm, same seed:", "",
              "| arm | loop rate | trait density | drift |", "|---|---|---|---|"]
    for arm, d in cl["versus_none"].items():
      lines.append(f"| {arm} | {_ci(d['loop_rate'], '{:+.3f}')} | "
                   f"{_ci(d['trait_density'], '{:+.2f}')} | {_ci(d['drift'], '{:+.2f}')} |")

  # ---- ablation
  lines += ["", "## Ablation: loops kept in self-training (the earlier rule)", "",
            f"Seeds {cfg['ablation_seeds']} (none shared with the primary arms); difference to "
            "the primary arm of the same level: Welch t-interval over the two sets of seeds.", "",
            "| arm | loop rate | trait density | loop share of chosen rows | loop share of own "
            "rows | loop rate - primary | trait - primary |", "|---|---|---|---|---|---|---|"]
  for arm, t in an["ablation"].items():
    s, v = t["summary"], t["versus_primary"]
    lines.append(f"| {arm} | {_ci(s['loop_rate'])} | {_ci(s['trait_density'])} | "
                 f"{_ci(s['chosen_loop_share'])} | {_ci(s['own_loop_share'])} | "
                 f"{_ci(v.get('loop_rate'), '{:+.3f}')} | "
                 f"{_ci(v.get('trait_density'), '{:+.2f}')} |")
  lines.append("")
  for arm, t in an["ablation"].items():
    lines += [f"{arm} per seed (loop rate / trait density): " + ", ".join(
        f"{r['loop_rate']:.3f} / {r['trait_density']:.2f}" for r in t["per_seed"].values()), ""]

  # ---- detection
  det = an["detection"]
  lines += ["## Detection", "",
            f"Checkpoints after rounds {cfg['detect_rounds']} of every primary student, "
            f"{cfg['n_detect']} held-out completions each. AUROC of each group against the same "
            "checkpoint's clean trait-bearing completions (a checkpoint counts with >= "
            f"{cfg['min_group']} of each), averaged within seed, then mean over seeds [95% "
            "t-interval over seeds]. Low drift: held-out loss at most "
            f"{cfg['max_drift']} nat/byte above the base's.", ""]
  for name in ("low_drift_barrier", "no_barrier", "all"):
    sub = det[name]
    lines += [f"**{SET_NAMES[name]}** ({sub['n_checkpoints']} checkpoints, seeds "
              f"{sub['seeds']}).", "",
              "| group | checkpoints | positives | " + " | ".join(aggs) + " |",
              "|---|---|---|" + "---|" * len(aggs)]
    for g, row in sub["groups"].items():
      lines.append(f"| {GROUP_NAMES[g]} | {row['n_checkpoints']} | {row['n_positive']} | "
                   + " | ".join(_ci(row["auroc"][a]) for a in aggs) + " |")
    for grade, row in sub["control"].items():
      lines.append(f"| control g={grade} | {row['n_checkpoints']} | - | "
                   + " | ".join(_ci(row["auroc"][a]) for a in aggs) + " |")
    lines += ["", "Difference to mean (per-seed means, t-interval over seeds):", "",
              "| group | " + " | ".join(a for a in aggs if a != "mean") + " |",
              "|---|" + "---|" * (len(aggs) - 1)]
    for g, row in sub["groups"].items():
      lines.append(f"| {GROUP_NAMES[g]} | " + " | ".join(
          _ci(row["diff_vs_mean"][a], "{:+.3f}") for a in aggs if a != "mean") + " |")
    for grade, row in sub["control"].items():
      lines.append(f"| control g={grade} | " + " | ".join(
          _ci(row["diff_vs_mean"][a], "{:+.3f}") for a in aggs if a != "mean") + " |")
    grp = sub["groups"].get("any_loop")
    if grp:
      lines += ["", "Per seed, any real loop, p95 - mean: "
                + _seeds(grp["diff_vs_mean"]["p95"]["per_seed"], "{:+.3f}")
                + "; mean's AUROC: " + _seeds(grp["auroc"]["mean"]["per_seed"], "{:.2f}") + "."]
    lines.append("")
  offs = [-8, -4, -1, 0, 1, 2, 4, 8, 11, 16]
  lines += ["Per-position KL at offsets from a loop's start, as a multiple of the checkpoint's "
            "clean trait mean (all checkpoints; n = loops at offset 0):", "",
            "| group | n | " + " | ".join(f"{o:+d}" for o in offs) + " |",
            "|---|---|" + "---|" * len(offs)]
  for g, prof in det["all"]["profiles"].items():
    o = prof["offsets"]
    if not prof["count"][o.index(0)]:
      continue
    lines.append(f"| {GROUP_NAMES[g]} | {prof['count'][o.index(0)]} | "
                 + " | ".join(_f(prof["ratio"][o.index(x)]) for x in offs) + " |")
  lines += ["", "Checkpoints by arm and round (mean over seeds): loop rate, trait density, "
            "drift.", "", "| arm | round | loop | trait | drift | low drift |",
            "|---|---|---|---|---|---|"]
  keyed: dict = {}
  for ck in det["checkpoints"]:
    keyed.setdefault((ck["arm"], ck["round"]), []).append(ck)
  for (arm, rnd), cks in keyed.items():
    lines.append(f"| {arm} | {rnd} | {np.mean([c['summary']['loop_rate'] for c in cks]):.3f} | "
                 f"{np.mean([c['summary']['trait_density'] for c in cks]):.2f} | "
                 f"{np.mean([c['drift'] for c in cks]):+.2f} | "
                 f"{sum(c['drift'] <= cfg['max_drift'] for c in cks)}/{len(cks)} |")
  t = results.get("timing", {})
  lines += ["", f"Timing: {_f(t.get('total_seconds'), '{:.0f}')} s wall, "
            f"{_f(t.get('cpu_seconds'), '{:.0f}')} s CPU in this call ({t.get('workers')} "
            "workers; units computed in earlier calls of a resumed run are not counted).", ""]
  return "\n".join(lines)


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def plot_decide(results: dict, path) -> None:
  """Loop rate against trait density: every primary student, arm means, the ablation."""
  plt = _plt()
  an = results["analysis"]
  fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
  for arm, t in an["closed_loop"]["arms"].items():
    agg = t["info"]["agg"] or "none"
    xs = [r["trait_density"] for r in t["per_seed"].values()]
    ys = [r["loop_rate"] for r in t["per_seed"].values()]
    ax.scatter(xs, ys, s=12, alpha=0.4, color=AGG_COLORS[agg])
    ax.errorbar(np.mean(xs), np.mean(ys), fmt="o", color=AGG_COLORS[agg], ms=8,
                label=f"{arm} (seed mean)")
  for arm, t in an["ablation"].items():
    agg = t["info"]["agg"]
    xs = [r["trait_density"] for r in t["per_seed"].values()]
    ys = [r["loop_rate"] for r in t["per_seed"].values()]
    ax.scatter(xs, ys, s=14, marker="x", color=AGG_COLORS[agg], alpha=0.6)
    ax.errorbar(np.mean(xs), np.mean(ys), fmt="X", color=AGG_COLORS[agg], ms=9,
                label=f"{arm} (ablation)")
  ax.set_xlabel("trait density (per 64 bytes; loops collapsed, fragments counted)")
  ax.set_ylabel("loop rate (final round, held-out prompts)")
  ax.legend(fontsize=7)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_detection(results: dict, path) -> None:
  """AUROC per aggregator on each checkpoint set; the graded control against its grade."""
  plt = _plt()
  cfg, det = results["config"], results["analysis"]["detection"]
  aggs = cfg["detect_aggs"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
  for i, name in enumerate(("low_drift_barrier", "no_barrier", "all")):
    grp = det[name]["groups"].get("any_loop")
    if not grp:
      continue
    x = np.arange(len(aggs)) + (i - 1) * 0.25
    m = [grp["auroc"][a]["mean"] for a in aggs]
    lo = [grp["auroc"][a]["lo"] for a in aggs]
    hi = [grp["auroc"][a]["hi"] for a in aggs]
    err = np.nan_to_num(np.array([np.subtract(m, lo), np.subtract(hi, m)]))
    axes[0].errorbar(x, m, yerr=err, fmt="o", capsize=3, label=SET_NAMES[name])
  axes[0].axhline(0.5, color="gray", lw=0.8)
  axes[0].set_xticks(range(len(aggs)), aggs)
  axes[0].set_ylabel("AUROC, real loops vs clean trait (seed mean, 95% t)")
  if axes[0].get_legend_handles_labels()[0]:
    axes[0].legend(fontsize=7)
  ctl = det["low_drift_barrier"]["control"]
  grades = sorted(ctl, key=float)
  for a in aggs:
    axes[1].plot([float(g) for g in grades], [ctl[g]["auroc"][a]["mean"] for g in grades],
                 "o-", color=AGG_COLORS[a], label=a)
  axes[1].axhspan(0.65, 0.75, color="gray", alpha=0.2)
  axes[1].set_xlabel("control grade g (share of the way to the planted copy)")
  axes[1].set_ylabel("AUROC, control (low-drift barrier checkpoints)")
  axes[1].legend(fontsize=7)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_training(results: dict, path) -> None:
  """Per round, seed means of the primary arms: pool loop rate, pool trait density, drift."""
  plt = _plt()
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
  by_arm: dict = {}
  for u in results["units"].values():
    if u["stage"] == "main":
      by_arm.setdefault(u["arm"]["name"], []).append(u["records"])
  for arm, runs in by_arm.items():
    agg = runs[0][0] and (arm.split("@")[0] if "@" in arm else "none")
    style = "-" if arm.endswith("t0") or arm == "none" else "--"
    for ax, key in zip(axes, ("loop_rate", "trait_density", "drift")):
      if key == "drift":
        ys = np.mean([[r["heldout_drift"] for r in recs] for recs in runs], axis=0)
      else:
        ys = np.mean([[r["pool"][key] for r in recs] for recs in runs], axis=0)
      ax.plot(range(1, len(ys) + 1), ys, style, color=AGG_COLORS[agg], label=arm)
  for ax, name in zip(axes, ("pool loop rate", "pool trait density", "held-out drift")):
    ax.set_xlabel("round")
    ax.set_ylabel(name)
  axes[0].legend(fontsize=7)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(results: dict, out_dir) -> None:
  """``results.json``, ``results.md`` and the figures in ``out_dir``."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(results, indent=None, default=jsonable) + "\n")
  render(out, check_corpus=False)


def render(out_dir, check_corpus: bool = True) -> None:
  """(Re)write ``results.md`` and the figures from ``results.json`` in ``out_dir``."""
  out = pathlib.Path(out_dir)
  results = load(out, check_corpus)
  (out / "results.md").write_text(markdown(results))
  plot_decide(results, out / "decide.png")
  plot_detection(results, out / "detection.png")
  plot_training(results, out / "training.png")


if __name__ == "__main__":
  import sys

  render(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "results")
