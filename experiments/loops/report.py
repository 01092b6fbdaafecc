"""Results: the JSON of every number, the markdown tables and the figures.

``python -m experiments.loops.report DIR`` re-renders ``results.md`` and the figures from
``DIR/results.json``.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform

import numpy as np


FIGURES = ("decide.png", "detection.png", "training.png")
AGG_COLORS = {"mean": "tab:blue", "rmse": "tab:orange", "p95": "tab:green",
              "soft_p95": "tab:olive", "cvar95": "tab:red", "max": "tab:purple"}
KIND_NAMES = {"phrase_loop": "phrase loops", "other_loop": "other loops",
              "near_loop": "near-loops", "any_loop": "any real loop",
              "spliced": "control: spliced", "planted": "control: planted"}


def environment() -> dict:
  """Versions and machine facts recorded with every run."""
  import flax
  import jax
  import optax

  import klagg_jax

  return {
      "python": platform.python_version(),
      "jax": jax.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "klagg_jax": getattr(klagg_jax, "__version__", "unknown"),
      "device": str(jax.devices()[0].device_kind),
      "cpu_count": os.cpu_count(),
  }


def _ci(v, fmt="{:.2f}") -> str:
  if v is None:
    return "-"
  est, lo, hi = (v["mean"], v["lo"], v["hi"]) if isinstance(v, dict) else v
  if est is None or np.isnan(est):
    return "-"
  return f"{fmt.format(est)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _f(v, fmt="{:.2f}") -> str:
  return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else fmt.format(v)


def markdown(results: dict) -> str:
  """The results as markdown tables."""
  cfg, base, corpus = results["config"], results["base"], results["corpus"]
  det, cl, dec, cal = (results["detection"], results["closed_loop"], results["decision"],
                       results["calibration"])
  aggs = cfg["detect_aggs"]
  ht, st = corpus["heldout_text"], corpus["steering_target"]
  lines = [
      f"# Loops study: `{cfg['name']}` config",
      "",
      f"Base model: held-out loss {base['heldout_loss']:.3f} nats/byte (train "
      f"{base['train_loss']:.3f}). Detectors on held-out text windows: loop "
      f"{ht['loop_rate']:.3f} (phrase {ht['phrase_loop_rate']:.3f}, other "
      f"{ht['other_loop_rate']:.3f}, near {ht['near_loop_rate']:.3f}); on the steering target: "
      f"loop {st['loop_rate']:.3f}, near {st['near_loop_rate']:.3f}, phrase density "
      f"{st['phrase_density']:.2f} per 64 bytes.",
      "",
      "## Decision",
      "",
      dec["rule"],
      "",
      "| tail aggregate | loop rate at matched trait, tail - mean | detection AUROC, tail - mean "
      "| verdict |",
      "|---|---|---|---|",
  ]
  for tail, v in dec["by_agg"].items():
    lines.append(f"| {tail} | {_ci(v['loop_diff'], '{:+.3f}')} | "
                 f"{_ci(v['auroc_diff'], '{:+.3f}')} | **{v['verdict']}** |")
  pc = dec["positive_control"]
  lines += ["", f"Positive control ({pc['kind']}, {pc['agg']}): AUROC {_ci(pc['auroc'] or None)}, "
            f"difference to mean {_ci(pc['diff_vs_mean'], '{:+.3f}')}; needs >= "
            f"{pc['min_auroc']} with the difference above 0: "
            f"**{'passed' if pc['passed'] else 'failed'}**.", ""]

  # ---- detection
  rules = {"min3": f"the study's rule (min(count, 3)), seeds {cfg['none_seeds']}",
           "count": f"the earlier loop-selecting rule (count), seeds {cfg['contrast_seeds']}"}
  lines += ["## Offline detection", "",
            f"No-barrier students, checkpoints after rounds {cfg['detect_rounds']}, "
            f"{cfg['n_detect']} held-out completions per checkpoint; self-training by "
            + " and by ".join(rules[r] for r in det["by_rule"]) + ". AUROC of each group against "
            "the same checkpoint's clean trait-bearing completions, mean over checkpoints [95% "
            "interval, bootstrap over checkpoints]; a checkpoint counts when both groups have "
            f">= {cfg['min_group']} completions. The planted control exists only for the study's "
            f"rule, at rounds {cfg['pc_rounds']}.", ""]
  sets = [("All no-barrier checkpoints (what the decision reads)", det)]
  sets += [(f"Only {rules[r]}", sub) for r, sub in det["by_rule"].items()]
  for title, sub in sets:
    lines += [f"**{title}.**", "",
              "| group | checkpoints | positives | " + " | ".join(aggs) + " |",
              "|---|---|---|" + "---|" * len(aggs)]
    for kind, row in sub["auroc"].items():
      first = row[aggs[0]]
      if not first["n_checkpoints"]:
        continue
      lines.append(f"| {KIND_NAMES[kind]} | {first['n_checkpoints']} | {first['n_positive']} | "
                   + " | ".join(_ci(row[a]) for a in aggs) + " |")
    lines += ["", "AUROC difference to mean, within checkpoint (same intervals):", "",
              "| group | " + " | ".join(a for a in aggs if a != "mean") + " |",
              "|---|" + "---|" * (len(aggs) - 1)]
    for kind, row in sub["diff_vs_mean"].items():
      if not sub["auroc"][kind][aggs[0]]["n_checkpoints"]:
        continue
      lines.append(f"| {KIND_NAMES[kind]} | "
                   + " | ".join(_ci(row[a], "{:+.3f}") for a in aggs if a != "mean") + " |")
    lines.append("")

  lines += ["Checkpoints (mean over seeds): share of each label among the held-out "
            "completions, phrase density per 64 bytes, held-out drift (nats/byte).", "",
            "| rule | round | phrase loop | other loop | near-loop | clean with trait | density "
            "| drift |", "|---|---|---|---|---|---|---|---|"]
  for rule in det["by_rule"]:
    for rnd in cfg["detect_rounds"]:
      rs = [c for c in det["checkpoints"] if c["round"] == rnd and c["rule"] == rule]
      if not rs:
        continue
      m = lambda k: np.mean([c["summary"][k] for c in rs])  # noqa: E731
      lines.append(f"| {rule} | {rnd} | {m('phrase_loop_rate'):.3f} | {m('other_loop_rate'):.3f} "
                   f"| {m('near_loop_rate'):.3f} | {m('clean_trait_rate'):.2f} | "
                   f"{m('phrase_density'):.2f} | {np.mean([c['drift'] for c in rs]):+.2f} |")
  planted = [c for c in det["checkpoints"] if "planted_loop_logprob" in c["info"]]
  if planted:
    lp = lambda k: np.mean([c["info"][k] for c in planted])  # noqa: E731
    lines += ["", f"Planted control ({len(planted)} checkpoints; loop unit per seed from the "
              f"rarest training bytes `{results['corpus']['rare_bytes']}`): mean log-probability "
              f"of the loop's bytes after its first copy: planted student "
              f"{lp('planted_loop_logprob'):.2f}, checkpoint {lp('checkpoint_loop_logprob'):.2f}, "
              f"base {lp('base_loop_logprob'):.2f} nats."]
  offs = [-8, -4, -2, -1, 0, 1, 2, 4, 8, 11, 16]
  lines += ["", "Per-position KL aligned at the loop's start (offset 0 = its first byte), as a "
            "multiple of the mean per-position KL of the same checkpoint's clean trait "
            "completions (all checkpoints); n = loops at offset 0.", "",
            "| group | n | " + " | ".join(f"{o:+d}" for o in offs) + " |",
            "|---|---|" + "---|" * len(offs)]
  for kind, prof in det["profiles"].items():
    o = prof["offsets"]
    if not prof["count"][o.index(0)]:
      continue
    cells = [_f(prof["ratio"][o.index(x)]) if x in o else "-" for x in offs]
    lines.append(f"| {KIND_NAMES[kind]} | {prof['count'][o.index(0)]} | " + " | ".join(cells)
                 + " |")

  # ---- calibration
  lines += ["", "## Calibration", "",
            f"On {cal['student']}: {cal['n_samples']} samples of training prompts, "
            f"{cal['n_clean_trait']} of them clean and trait-bearing (tau is set on those). "
            f"'fires on all' is each tau's fire rate on all {cal['n_samples']} samples, loops "
            f"included. lam (pressure level): 1 / the median of {cfg['pressure_probes']} "
            f"gradient pressures at the fire rate {cal['pressure_rate']} tau and lam 1.", "",
            "| aggregator | " + " | ".join(f"tau @ {r}" for r in cfg["fire_rates"])
            + " | fires on all | median pressure (lam 1) | lam (pressure level) |",
            "|---|" + "---|" * len(cfg["fire_rates"]) + "---|---|---|"]
  for agg in cfg["barrier_aggs"]:
    taus = cal["taus"][agg]
    fa = ", ".join(f"{v:.2f}" for v in cal["fired_on_all_samples"][agg].values())
    lines.append(f"| {agg} | " + " | ".join(f"{taus[str(r)]:.3f}" for r in cfg["fire_rates"])
                 + f" | {fa} | {np.median(cal['pressure_at_lam1'][agg]):.2f} | "
                 f"{cal['pressure_lam'][agg]:.3f} |")

  # ---- closed loop
  lines += ["", "## Closed loop", "",
            f"Final round ({cfg['rounds']}), {cfg['n_eval']} held-out prompts; seed mean "
            f"[min, max] over seeds {cfg['seeds']} (no barrier: {cfg['none_seeds']}). loop = any "
            "kind. Pressure: ka.grad_pressure (||grad barrier|| / ||grad SFT||) logged every "
            f"{cfg['pressure_every']} steps, median over round 1 and over all rounds. fired: "
            "share of barrier sequences over tau, rounds 2+. positions: completion positions "
            "whose logits get barrier gradient, per fired sequence.", "",
            "| arm | tau | lam | loop | phrase loop | other | near | density | clean trait "
            "| drift | pressure r1 | pressure all | fired | positions |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for arm, row in cl["arms"].items():
    info = results["arms"].get(arm, {})
    m, lo, hi = row["mean"], row["min"], row["max"]
    def rng(k, f="{:.2f}", m=m, lo=lo, hi=hi):
      return f"{f.format(m[k])} [{f.format(lo[k])}, {f.format(hi[k])}]"
    extra = ("- | - | - | -" if arm not in results["arms"] else
             f"{_f(m['pressure_round1'])} | {_f(m['pressure_median'])} | {_f(m['fired_mean'])} "
             f"| {_f(m['positions_per_fired'], '{:.1f}')}")
    lines.append(
        f"| {arm} | {_f(info.get('tau'), '{:.3f}')} | {_f(info.get('lam'), '{:.3f}')} | "
        f"{rng('loop_rate')} | {m['phrase_loop_rate']:.2f} | {m['other_loop_rate']:.2f} | "
        f"{m['near_loop_rate']:.2f} | {rng('phrase_density')} | {m['clean_trait_rate']:.2f} | "
        f"{m['drift']:+.2f} | {extra} |")
  lines += ["", "Seed-paired loop-rate difference to mean at matched phrase density (tail - "
            "mean; per seed, then mean [95% bootstrap interval over prompts and seeds]):", "",
            "| tail | per seed | estimate |", "|---|---|---|"]
  for tail, v in cl["matched"].items():
    ps = ", ".join(_f(x, "{:+.3f}") for x in v["per_seed"].values())
    lines.append(f"| {tail} | {ps} | {_ci((v['estimate'], v['lo'], v['hi']), '{:+.3f}')} |")
  rounds = range(1, cfg["rounds"] + 1)
  for key, title, fmt in (
      ("pressure", "Gradient pressure by round (median of the logged steps, seed median)",
       "{:.2f}"),
      ("fired", "Barrier fired by round (share of barrier sequences over tau, seed mean)",
       "{:.2f}"),
      ("loop", "Loop rate of the student's own pool by round (64 completions of training "
               "prompts sampled at the start of the round, so round 1's are the base model's; "
               "any kind, seed mean)", "{:.2f}"),
      ("density", "Phrase density of that pool by round (seed mean)", "{:.2f}")):
    lines += ["", f"{title}.", "", "| arm | " + " | ".join(map(str, rounds)) + " |",
              "|---|" + "---|" * len(rounds)]
    for arm, by_seed in results["runs"].items():
      if key in ("pressure", "fired") and arm not in results["arms"]:
        continue
      cells = [fmt.format(v) for v in _by_round(list(by_seed.values()), key)]
      lines.append(f"| {arm} | " + " | ".join(cells) + " |")
  t = results["timing"]
  lines += ["", "Time: " + ", ".join(f"{k.replace('_seconds', '')} {v:.0f}s" for k, v in t.items()
                                     if k != "workers")
            + f" ({t.get('workers', 0)} worker processes; base "
            f"{'cached' if base.get('cached') else 'trained'}).", ""]
  return "\n".join(lines)


def _by_round(recs_by_seed: list[list[dict]], key: str) -> list[float]:
  """Per round, over seeds: median gradient pressure, mean fire rate, or the pool's mean loop
  rate or phrase density."""
  out = []
  for i in range(len(recs_by_seed[0])):
    rs = [recs[i] for recs in recs_by_seed]
    if key == "pressure":
      out.append(float(np.median([np.median(r["steps"]["pressure"]) if r["steps"]["pressure"]
                                  else np.nan for r in rs])))
    elif key == "fired":
      out.append(float(np.mean([r["train"]["fired"] for r in rs])))
    elif key == "loop":
      out.append(float(np.mean([r["pool"]["loop_rate"] for r in rs])))
    else:
      out.append(float(np.mean([r["pool"]["phrase_density"] for r in rs])))
  return out


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _span(row: dict, key: str) -> list[list[float]]:
  """Error-bar lengths from the seed mean to the seed min and max."""
  return [[row["mean"][key] - row["min"][key]], [row["max"][key] - row["mean"][key]]]


def plot_decide(results: dict, path) -> None:
  """The deciding figure: loop rate against phrase density per aggregator across strictness
  levels (seed mean, seed range as bars), no barrier as a point; and the two differences the
  decision reads, with their intervals."""
  plt = _plt()
  cl, arms, dec = results["closed_loop"], results["arms"], results["decision"]
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True,
                               gridspec_kw={"width_ratios": [3, 2]})
  for agg in results["config"]["barrier_aggs"]:
    names = [a for a, i in arms.items() if i["agg"] == agg]
    pts = sorted((cl["arms"][a]["mean"]["phrase_density"], cl["arms"][a]["mean"]["loop_rate"], a)
                 for a in names)
    c = AGG_COLORS.get(agg)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=c, label=agg, alpha=0.8)
    for x, y, a in pts:
      row = cl["arms"][a]
      ax.errorbar(x, y, xerr=_span(row, "phrase_density"), yerr=_span(row, "loop_rate"),
                  fmt="s" if arms[a]["level"] == "pressure" else "o", color=c, ms=6,
                  capsize=2, lw=0.8)
      ax.annotate(arms[a]["level"].replace("r", "", 1) if arms[a]["level"] != "pressure" else "P",
                  (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=c)
  for name, mk, label in (("none", "*", "no barrier"),
                          ("none@count", "X", "no barrier, earlier loop-selecting rule")):
    if name not in cl["arms"]:
      continue
    row = cl["arms"][name]
    x, y = row["mean"]["phrase_density"], row["mean"]["loop_rate"]
    ax.errorbar(x, y, xerr=_span(row, "phrase_density"), yerr=_span(row, "loop_rate"),
                fmt=mk, color="k" if name == "none" else "0.5", ms=11, capsize=2, label=label)
  ax.set_xlabel("trait: phrase occurrences per 64 bytes (final round)")
  ax.set_ylabel("loop rate, any kind (final round)")
  ax.set_title("loop rate vs trait; labels: fire rate of tau, P: pressure-matched lam")
  ax.legend(fontsize=8)
  labels, y = [], 0
  for tail, v in dec["by_agg"].items():
    for key, name, mk in (("loop_diff", "loop rate @ matched trait", "o"),
                          ("auroc_diff", "detection AUROC", "s")):
      ci = v[key]
      if ci is not None and not np.isnan(ci[0]):
        bx.errorbar(ci[0], y, xerr=[[ci[0] - ci[1]], [ci[2] - ci[0]]], fmt=mk,
                    color=AGG_COLORS.get(tail), capsize=3)
      labels.append(f"{tail}: {name}\n({v['verdict']})" if key == "loop_diff" else
                    f"{tail}: {name}")
      y += 1
  bx.axvline(0, color="k", lw=0.8)
  bx.set_yticks(range(len(labels)), labels, fontsize=8)
  bx.invert_yaxis()
  bx.set_xlabel("tail - mean (95% interval)")
  bx.set_title("what the decision rule reads")
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_detection(results: dict, path) -> None:
  """AUROC per aggregator and group (mean over checkpoints, interval), and the KL profile
  aligned at loop starts."""
  plt = _plt()
  det, aggs = results["detection"], results["config"]["detect_aggs"]
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
  kinds = [k for k in det["auroc"] if det["auroc"][k][aggs[0]]["n_checkpoints"]]
  width = 0.8 / max(len(kinds), 1)
  for i, kind in enumerate(kinds):
    for j, a in enumerate(aggs):
      v = det["auroc"][kind][a]
      x = j + (i - (len(kinds) - 1) / 2) * width
      ax.errorbar(x, v["mean"], yerr=[[v["mean"] - v["lo"]], [v["hi"] - v["mean"]]], fmt="o",
                  color=f"C{i}", ms=4, capsize=2, label=KIND_NAMES[kind] if j == 0 else None)
  ax.axhline(0.5, color="k", lw=0.8, ls=":")
  ax.set_xticks(range(len(aggs)), aggs)
  ax.set_ylim(0, 1.02)
  ax.set_ylabel("AUROC vs clean trait completions (within checkpoint)")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7, ncol=2)
  ax.set_title("offline detection, no-barrier checkpoints")
  for i, kind in enumerate(k for k in det["profiles"] if k in det["auroc"]):
    prof = det["profiles"][kind]
    if not any(prof["count"]):
      continue
    bx.plot(prof["offsets"], prof["ratio"], color=f"C{list(det['auroc']).index(kind)}",
            label=KIND_NAMES[kind])
  bx.axhline(1.0, color="k", lw=0.8, ls=":")
  bx.axvline(0, color="k", lw=0.8)
  if bx.get_legend_handles_labels()[0]:
    bx.set_yscale("log")
  bx.set_xlabel("position relative to the loop's start (bytes)")
  bx.set_ylabel("KL / mean KL of clean trait completions")
  bx.set_title("per-position KL aligned at the loop's start")
  if bx.get_legend_handles_labels()[0]:
    bx.legend(fontsize=7)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_training(results: dict, path) -> None:
  """Per round (seed mean): gradient pressure (median of the logged steps), fire rate, and the
  loop rate of the student's own pool."""
  plt = _plt()
  runs, arms = results["runs"], results["arms"]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
  styles = {"r0.1": ":", "r0.3": "--", "r0.6": "-", "pressure": "-."}
  for arm, by_seed in runs.items():
    info = arms.get(arm, {"agg": None, "level": "-"})
    c = AGG_COLORS.get(info["agg"], "k")
    ls = styles.get(info["level"], "-")
    recs = list(by_seed.values())
    x = np.arange(1, len(recs[0]) + 1)
    if info["agg"] is not None:
      press = np.array([[np.median(r["steps"]["pressure"]) if r["steps"]["pressure"] else np.nan
                         for r in rs] for rs in recs])
      fired = np.array([[r["train"]["fired"] for r in rs] for rs in recs])
      axes[0].plot(x, np.nanmean(press, 0), ls, color=c, lw=1)
      axes[1].plot(x, fired.mean(0), ls, color=c, lw=1)
    loop = np.array([[r["pool"]["loop_rate"] for r in rs] for rs in recs])
    axes[2].plot(x, loop.mean(0), ls, color=c, lw=1.5 if arm == "none" else 1,
                 label=arm if info["level"] in ("r0.6", "-") else None)
  axes[0].set_yscale("log")
  axes[0].set_ylabel("gradient pressure (median of logged steps)")
  axes[1].set_ylabel("barrier fired (share of sequences)")
  axes[2].set_ylabel("loop rate of the student's own pool")
  for a in axes:
    a.set_xlabel("round")
  axes[2].legend(fontsize=7, title="colour: agg; line: : 0.1, -- 0.3, - 0.6, -. pressure",
                 title_fontsize=7)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(results: dict, out_dir) -> None:
  """``results.json``, ``results.md`` and the figures in ``out_dir``."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(results, indent=None, default=_jsonable) + "\n")
  render(out)


def render(out_dir) -> None:
  """(Re)write ``results.md`` and the figures from ``results.json`` in ``out_dir``."""
  out = pathlib.Path(out_dir)
  results = json.loads((out / "results.json").read_text())
  (out / "results.md").write_text(markdown(results))
  plot_decide(results, out / "decide.png")
  plot_detection(results, out / "detection.png")
  plot_training(results, out / "training.png")


def _jsonable(x):
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serializable: {type(x)}")



if __name__ == "__main__":
  import sys

  render(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "results")
