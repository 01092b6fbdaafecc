"""Exploratory follow-up, run after the full study: ``python -m experiments.loops.followup``.

Not part of the decision. In the full run the mean and rmse barriers held the phrase density
at 0.1-1.5 per 64 bytes at every pre-registered strictness level, while p95 and cvar95 let it
reach 1.1-3.8, so their loop rates could be compared at matched trait only where one seed's
curves happened to overlap. This adds lenient mean and rmse arms (the fire-rate 0.1 tau with a
smaller lam), same seeds and common random numbers, and redoes the matched-trait comparison
with every level; it also compares each barrier arm with the no-barrier arm seed by seed. It
reads ``results/results.json`` (calibration, runs) and writes ``results/followup.json``,
``results/followup.md`` and ``results/followup.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import numpy as np

from experiments.loops import analysis, config, decision, report, run, steer

LAMS: tuple[float, ...] = (0.1, 0.3)
AGGS: tuple[str, ...] = ("mean", "rmse")


def extra_arms(calib: dict) -> list[steer.Arm]:
  """The lenient arms: the fire-rate 0.1 tau of each aggregator with lam in ``LAMS``."""
  return [steer.Arm(f"{agg}@lam{lam}", agg, tau=calib["taus"][agg]["0.1"], lam=lam,
                    level=f"lam{lam}") for agg in AGGS if agg in calib["taus"] for lam in LAMS]


def versus_none(results: dict, cfg: config.Config) -> dict:
  """Per barrier arm: the seed-paired difference (arm - no barrier) in final-round loop rate
  and phrase density, with a bootstrap interval over held-out prompts (paired) and seeds."""
  rng = np.random.default_rng(2)
  finals = {a: {int(s): recs[-1]["eval"]["per_completion"] for s, recs in by.items()}
            for a, by in results["runs"].items()}
  out = {}
  for arm in results["arms"]:
    seeds = sorted(set(finals[arm]) & set(finals["none"]))
    n = len(finals[arm][seeds[0]]["loop"])

    def diff(idx, pick, arm=arm):
      dl = [np.mean(np.asarray(finals[arm][s]["loop"])[idx])
            - np.mean(np.asarray(finals["none"][s]["loop"])[idx]) for s in pick]
      dd = [(np.mean(np.asarray(finals[arm][s]["phrase_count"])[idx])
             - np.mean(np.asarray(finals["none"][s]["phrase_count"])[idx]))
            * 64 / cfg.completion_len for s in pick]
      return float(np.mean(dl)), float(np.mean(dd))

    est = diff(np.arange(n), seeds)
    boots = np.array([diff(rng.integers(0, n, n), rng.choice(seeds, len(seeds)))
                      for _ in range(cfg.n_boot)])
    q = [(1 - decision.LEVEL) / 2, (1 + decision.LEVEL) / 2]
    out[arm] = {"loop": [est[0], *np.quantile(boots[:, 0], q).tolist()],
                "density": [est[1], *np.quantile(boots[:, 1], q).tolist()],
                "seeds": seeds}
  return out


def markdown(follow: dict) -> str:
  lines = ["# Loops study: exploratory follow-up (not part of the decision)", "",
           __doc__.split("\n\n", 1)[1].split("It\nreads")[0].strip(), "",
           "Lenient arms, final round (seed mean [min, max]):", "",
           "| arm | tau | lam | loop | density | clean trait | drift | pressure all | fired |",
           "|---|---|---|---|---|---|---|---|---|"]
  for arm, row in follow["closed_loop"]["arms"].items():
    if arm not in follow["extra_arms"]:
      continue
    info = follow["extra_arms"][arm]
    m, lo, hi = row["mean"], row["min"], row["max"]
    lines.append(
        f"| {arm} | {info['tau']:.3f} | {info['lam']:.2f} | {m['loop_rate']:.2f} "
        f"[{lo['loop_rate']:.2f}, {hi['loop_rate']:.2f}] | {m['phrase_density']:.2f} "
        f"[{lo['phrase_density']:.2f}, {hi['phrase_density']:.2f}] | {m['clean_trait_rate']:.2f} "
        f"| {m['drift']:+.2f} | {m['pressure_median']:.2f} | {m['fired_mean']:.2f} |")
  lines += ["", "Loop-rate difference to mean at matched phrase density with every level "
            "(pre-registered four plus the lenient ones; seed-paired, 95% bootstrap interval "
            "over prompts and seeds; seeds whose curves do not overlap drop out):", "",
            "| tail | per seed | estimate | bootstrap replicates with an overlap |",
            "|---|---|---|---|"]
  for tail, v in follow["matched"].items():
    ps = ", ".join("-" if np.isnan(x) else f"{x:+.3f}" for x in v["per_seed"].values())
    est = "-" if np.isnan(v["estimate"]) else (f"{v['estimate']:+.3f} [{v['lo']:+.3f}, "
                                              f"{v['hi']:+.3f}]")
    lines.append(f"| {tail} | {ps} | {est} | {v['n_boot_used']} |")
  lines += ["", "Each barrier arm against no barrier, seed by seed (arm - none; 95% bootstrap "
            "interval over prompts and seeds):", "",
            "| arm | loop rate | phrase density |", "|---|---|---|"]
  for arm, v in follow["versus_none"].items():
    lines.append(f"| {arm} | {v['loop'][0]:+.3f} [{v['loop'][1]:+.3f}, {v['loop'][2]:+.3f}] | "
                 f"{v['density'][0]:+.2f} [{v['density'][1]:+.2f}, {v['density'][2]:+.2f}] |")
  lines += ["", f"Time: {follow['seconds']:.0f}s.", ""]
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--results", type=pathlib.Path, default=run.HERE / "results")
  parser.add_argument("--cache", type=pathlib.Path, default=run.HERE / "cache")
  parser.add_argument("--workers", type=int, default=None)
  parser.add_argument("--render", action="store_true",
                      help="only re-render followup.md / .png from followup.json")
  args = parser.parse_args(argv)
  out = args.results
  results = json.loads((out / "results.json").read_text())
  cfg = config.PRESETS[results["config"]["name"]]
  if not args.render:
    t0 = time.time()
    arms = extra_arms(results["calibration"])
    exp = run.Experiment(cfg, args.cache, log=lambda m: print(m, flush=True))
    runner = run._Runner(exp, cfg, args.cache, cfg.workers if args.workers is None
                         else args.workers)
    try:
      tasks = [(arm, seed) for arm in arms for seed in cfg.seeds]
      done = runner.map(run._arm_task, tasks)
    finally:
      runner.close()
    runs = {}
    for (arm, seed), res in zip(tasks, done):
      runs.setdefault(arm.name, {})[str(seed)] = res["records"]
    follow = {"extra_arms": {a.name: dataclasses.asdict(a) for a in arms}, "runs": runs,
              "seconds": time.time() - t0}
  else:
    follow = json.loads((out / "followup.json").read_text())
  merged = {**results, "runs": {**results["runs"], **follow["runs"]},
            "arms": {**results["arms"], **follow["extra_arms"]}}
  merged_cfg = config.PRESETS[results["config"]["name"]]
  follow["closed_loop"] = analysis.closed_loop(merged, merged_cfg)
  follow["matched"] = follow["closed_loop"]["matched"]
  follow["versus_none"] = versus_none(merged, merged_cfg)
  (out / "followup.json").write_text(json.dumps(follow, default=report._jsonable) + "\n")
  (out / "followup.md").write_text(markdown(follow))
  merged["closed_loop"] = follow["closed_loop"]
  merged["decision"] = {"by_agg": {t: {"loop_diff": None if t not in follow["matched"] else (
      follow["matched"][t]["estimate"], follow["matched"][t]["lo"], follow["matched"][t]["hi"]),
      "auroc_diff": results["decision"]["by_agg"][t]["auroc_diff"],
      "verdict": "exploratory"} for t in decision.TAIL_AGGS}}
  report.plot_decide(merged, out / "followup.png")
  print(f"wrote {out / 'followup.md'}")


if __name__ == "__main__":
  main()
