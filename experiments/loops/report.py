"""Results: the JSON of every number, a markdown table and the plot."""

from __future__ import annotations

import json
import os
import pathlib
import platform

import numpy as np


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


def public(record: dict) -> dict:
    """A per-round record without its private arrays (keys starting with ``_``)."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _series(results: dict, arm: str, key: str) -> np.ndarray:
    """``[n_seeds, rounds + 1]`` of a per-round number for one arm (training stats such as
    ``fired`` are read from ``record["train"]`` and are NaN at round 0)."""
    by_seed = results["runs"][arm]

    def get(r):
        return r[key] if key in r else r.get("train", {}).get(key, np.nan)

    return np.array([[get(r) for r in by_seed[s]] for s in sorted(by_seed, key=int)], float)


def coherent_rounds(loop_rates, threshold: float) -> int:
    """Rounds from round 1 on before the loop rate first exceeds ``threshold``."""
    n = 0
    for rate in loop_rates[1:]:
        if rate > threshold:
            break
        n += 1
    return n


def summarize(results: dict) -> dict:
    """Per arm: final-round means and seed spread, and rounds of coherence per seed."""
    threshold = results["config"]["coherence_threshold"]
    out = {"coherence_threshold": threshold}
    for arm in results["runs"]:
        loop = _series(results, arm, "loop_rate")
        trait = _series(results, arm, "trait_rate")
        drift = _series(results, arm, "heldout_drift")
        by_seed = results["runs"][arm]
        fired = _series(results, arm, "fired")[:, 1:]
        last = {k: float(np.mean([by_seed[s][-1]["train"][k] for s in by_seed]))
                for k in ("div", "kl_mean", "kl_p95", "kl_max")}
        out[arm] = {
            "tau": results["calibration"]["taus"].get(arm),
            "final_loop_mean": float(loop[:, -1].mean()),
            "final_loop_min": float(loop[:, -1].min()),
            "final_loop_max": float(loop[:, -1].max()),
            "final_trait_mean": float(trait[:, -1].mean()),
            "final_trait_min": float(trait[:, -1].min()),
            "final_trait_max": float(trait[:, -1].max()),
            "final_drift_mean": float(drift[:, -1].mean()),
            "coherent_rounds": [coherent_rounds(row, threshold) for row in loop],
            "fired_mean": float(np.mean(fired)) if arm != "none" else None,
            "final_train_kl": last,
            "loop_by_round": loop.mean(0).tolist(),
            "trait_by_round": trait.mean(0).tolist(),
            "drift_by_round": drift.mean(0).tolist(),
            "repeat_by_round": _series(results, arm, "longest_repeat_mean").mean(0).tolist(),
            "fired_by_round": [None] + fired.mean(0).tolist(),
        }
    return out


def _pm(mean, lo, hi) -> str:
    return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"


def markdown(results: dict) -> str:
    """The results as markdown tables."""
    s, base, cfg = results["summary"], results["base"], results["config"]
    rounds = cfg["rounds"]
    lines = [
        f"# Loops experiment: `{cfg['name']}` config",
        "",
        f"Base model: held-out loss {base['heldout_loss']:.3f} nats/byte "
        f"(train {base['train_loss']:.3f}). "
        f"Held-out text itself: loop rate {results['corpus']['heldout_text_loop_rate']:.3f}. "
        f"Seeds: {len(cfg['seeds'])}; {rounds} rounds x {cfg['steps_per_round']} steps; "
        f"fire rate {cfg['fire_rate']}, lam {cfg['lam']}; tau calibrated on "
        f"{results['calibration']['student']}.",
        "",
        f"Final round (round {rounds}) on {cfg['n_eval']} held-out prompts; mean [min, max] over "
        f"seeds. 'Coherent rounds': rounds before the loop rate first exceeds "
        f"{s['coherence_threshold']:.2f}, per seed. 'Barrier fired': share of the barrier's "
        f"sequences over tau, mean over rounds 1-{rounds}. div, kl_mean, kl_p95, kl_max: the "
        f"barrier's metrics on the student's own samples in round {rounds} (seed mean).",
        "",
        "| arm | tau | loop rate | trait rate | held-out drift | coherent rounds | barrier fired "
        "| div | kl_mean | kl_p95 | kl_max |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in results["runs"]:
        a = s[arm]
        tau = "-" if a["tau"] is None else f"{a['tau']:.3f}"
        fired = "-" if a["fired_mean"] is None else f"{a['fired_mean']:.2f}"
        lines.append(
            f"| {arm} | {tau} | {_pm(a['final_loop_mean'], a['final_loop_min'], a['final_loop_max'])}"
            f" | {_pm(a['final_trait_mean'], a['final_trait_min'], a['final_trait_max'])}"
            f" | {a['final_drift_mean']:+.3f} | {', '.join(map(str, a['coherent_rounds']))}"
            f" | {fired} | " + " | ".join(f"{a['final_train_kl'][k]:.2f}" for k in
                                          ("div", "kl_mean", "kl_p95", "kl_max")) + " |")
    by_round = (("loop_by_round", "Loop rate"), ("trait_by_round", "Trait rate"),
                ("drift_by_round", "Held-out loss drift (nats/byte)"),
                ("repeat_by_round", "Longest back-to-back repeat (bytes, mean over completions; "
                                    "any n-gram repeated at least twice)"),
                ("fired_by_round", "Barrier fired (share of barrier sequences over tau, "
                                   "mean over the round's steps)"))
    for key, title in by_round:
        lines += ["", f"{title} by round (mean over seeds; round 0 is the base model).", "",
                  "| arm | " + " | ".join(str(r) for r in range(rounds + 1)) + " |",
                  "|---|" + "---|" * (rounds + 1)]
        for arm in results["runs"]:
            if key == "fired_by_round" and arm == "none":
                continue
            fmt = {"drift_by_round": "{:+.2f}", "repeat_by_round": "{:.1f}"}.get(key, "{:.2f}")
            cells = ("-" if v is None else fmt.format(v) for v in s[arm][key])
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    d = results["detection"]
    lines += ["", "What each barrier would see on the held-out completions of every arm, seed and "
              f"round >= 1 ({d['n_looping']} looping, {d['n_clean']} clean): share over its tau, "
              "and median aggregate.", "",
              "| aggregator | tau | fires on looping | fires on clean | median looping | median clean |",
              "|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for agg, row in d.items():
        if isinstance(row, dict):
            lines.append(f"| {agg} | {row['tau']:.3f} | {fmt(row['fired_looping'])} | "
                         f"{fmt(row['fired_clean'])} | {fmt(row['median_div_looping'])} | "
                         f"{fmt(row['median_div_clean'])} |")
    t = results["timing"]
    lines += ["", f"Total time {t['total_seconds']:.0f}s (base {t['base_seconds']:.0f}s, "
              f"{'cached' if base.get('cached') else 'trained'}); "
              + ", ".join(f"{k} {v:.0f}s" for k, v in t["arm_seconds"].items()) + ".", ""]
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    """Loop rate, trait rate and held-out drift vs round: one line per arm (seed mean), seed
    min-max shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("loop_rate", "loop rate"), ("trait_rate", "trait rate"),
              ("heldout_drift", "held-out loss drift (nats/byte)"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    cfg = results["config"]
    x = np.arange(cfg["rounds"] + 1)
    for arm in results["runs"]:
        for ax, (key, label) in zip(axes, panels):
            y = _series(results, arm, key)
            (line,) = ax.plot(x, y.mean(0), marker="o", ms=3, label=arm)
            ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.15, lw=0)
            ax.set_xlabel("round")
            ax.set_xticks(x)
            ax.set_ylabel(label)
    for ax in axes[:2]:
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(title="barrier agg", fontsize=8)
    fig.suptitle(f"Steering with a KL barrier per aggregator ({cfg['name']} config, "
                 f"{len(cfg['seeds'])} seeds; line: seed mean, shaded: seed min-max)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: dict, out_dir) -> None:
    """``results.json``, ``results.md`` and ``loops.png`` in ``out_dir``."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_jsonable) + "\n")
    render(out)


def render(out_dir) -> None:
    """(Re)write ``results.md`` and ``loops.png`` from ``results.json`` in ``out_dir``."""
    out = pathlib.Path(out_dir)
    results = json.loads((out / "results.json").read_text())
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "loops.png")


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serializable: {type(x)}")


if __name__ == "__main__":
    import sys

    render(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "results")
