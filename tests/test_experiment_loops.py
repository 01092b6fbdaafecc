"""Tests of the loops study (experiments/loops): loop labels, self-training selection, the
statistics and decision rule, the positive control's splice, and the quick pipeline end to end."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from experiments.loops import (  # noqa: E402
    analysis, base, config, data, decision, metrics, model, run, stats, steer)

PHRASE = b"by the way"
DET = metrics.Detectors(PHRASE)


def _b(text: str) -> np.ndarray:
  return np.frombuffer(text.encode("ascii"), np.uint8)


# ---- the loop metric ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("ab" * 6, True),                     # n=2, 6 copies, span 12
    ("ab" * 5, False),                    # span 10 < 12
    ("the " * 3, True),                   # n=4, 3 copies, span 12
    ("the the the", False),               # 2 whole copies of "the " (the third is partial)
    ("x" * 12, True),
    ("x" * 11, False),
    ("we said by the way by the way by the way.", True),  # n=11, 3 copies inside text
    ("by the way by the way, fine", False),                # only 2 copies
    ("abcd-abcd-abcd", False),            # "abcd-" twice plus a partial copy
    ("abcd-abcd-abcd-", True),            # three whole copies, span 15
    ("abc abc.abc abc", False),           # copies not adjacent
    ("a twenty-byte phrase" * 2, False),  # 2 copies only
    ("0123456789abcdefghijk" * 3, False),  # n=21 > max_n=20
    ("0123456789abcdefghij" * 3, True),   # n=20, 3 copies
    ("Return a new list containing all items from the iterable in ascending order.", False),
    ("", False),
])
def test_has_loop_hand_made(text, expected):
  assert metrics.has_loop(_b(text)) is expected
  assert (metrics.find_loop(_b(text)) is not None) is expected


def test_has_loop_thresholds_are_keywords():
  x = _b("abababab")  # 4 copies of "ab", span 8
  assert not metrics.has_loop(x)
  assert metrics.has_loop(x, min_span=8)
  assert not metrics.has_loop(x, min_span=8, min_repeats=5)
  assert not metrics.has_loop(x, min_span=8, max_n=1)


def _loops_brute_force(x, max_n=20, min_repeats=3, min_span=12):
  """Direct reading of the definition: every (start, n, copies) that qualifies."""
  x = list(x)
  found = []
  for n in range(1, max_n + 1):
    for i in range(len(x)):
      if i + n > len(x):
        break
      k = 1
      while x[i + k * n : i + (k + 1) * n] == x[i : i + n] and i + (k + 1) * n <= len(x):
        k += 1
      if k >= min_repeats and k * n >= min_span:
        found.append((i, n))
  return found


def test_has_loop_and_find_loop_match_brute_force():
  rng = np.random.default_rng(0)
  checked_loops = 0
  for trial in range(400):
    alphabet = 1 + trial % 3  # tiny alphabets make repeats common
    x = rng.integers(0, alphabet, size=int(rng.integers(0, 40)))
    if trial % 4 == 0 and len(x) > 4:  # plant a repeat of a random n-gram
      n = int(rng.integers(1, 8))
      gram = rng.integers(0, 5, n)
      x = np.concatenate([x[:3], np.tile(gram, int(rng.integers(2, 6))), x[3:]])
    for kwargs in ({}, {"min_span": 6, "min_repeats": 2, "max_n": 5}):
      found = _loops_brute_force(x, **kwargs)
      assert metrics.has_loop(x, **kwargs) == bool(found), (x.tolist(), kwargs)
      got = metrics.find_loop(x, **kwargs)
      if found:
        start = min(i for i, _ in found)
        assert got is not None and got[0] == start, (x.tolist(), kwargs, got)
        assert got[1] == min(n for i, n in found if i == start)
      else:
        assert got is None
      checked_loops += bool(found)
  assert checked_loops > 50  # the comparison saw both outcomes


def test_longest_repeat():
  assert metrics.longest_repeat(_b("xx by the way by the way by the way")) == (33, 11, 3)
  assert metrics.longest_repeat(_b("aaaa")) == (4, 1, 4)
  assert metrics.longest_repeat(_b("abcdef")) == (0, 0, 0)


def test_strip_phrase_deletes_phrase_and_one_space_and_maps_back():
  x = _b("a by the way b by the way")
  kept, index = metrics.strip_phrase(x, PHRASE)
  assert bytes(kept.tolist()) == b"a b"
  assert x[index].tolist() == kept.tolist()
  kept, _ = metrics.strip_phrase(_b("by the way to by the way to by the way to "), PHRASE)
  assert bytes(kept.tolist()) == b"to to to "
  kept, index = metrics.strip_phrase(_b("no phrase here"), PHRASE)
  assert bytes(kept.tolist()) == b"no phrase here" and index.tolist() == list(range(14))


def _repeat_pair_brute_force(x):
  x, best = list(x), 0
  for i in range(len(x)):
    for j in range(i + 1, len(x)):
      k = 0
      while j + k < len(x) and x[i + k] == x[j + k] and i + k < j:
        k += 1
      best = max(best, k)
  return best


def test_longest_repeat_pair_matches_brute_force():
  rng = np.random.default_rng(1)
  for trial in range(200):
    x = rng.integers(0, 1 + trial % 4, size=int(rng.integers(0, 30)))
    length, first, second = metrics.longest_repeat_pair(x)
    assert length == _repeat_pair_brute_force(x), x.tolist()
    if length:
      assert first + length <= second  # no overlap
      assert x[first : first + length].tolist() == x[second : second + length].tolist()


@pytest.mark.parametrize("text, kind, start", [
    ("ok by the way to by the way to by the way to by the way it", "phrase_loop", 2),
    ("by the way >>> by the way >>> by the way >>> x", "other_loop", 11),
    ("so the the the the end by the way", "other_loop", 2),
    ("returns the list of items, by the way, and then the list of items", "near_loop", 47),
    ("by the way a by the way b by the way c by the way d", "clean", -1),  # the trait, often
    ("Return a new list containing all items from the iterable.", "clean", -1),
])
def test_label_kinds_and_starts(text, kind, start):
  lab = metrics.label(_b(text), DET)
  assert (lab.kind, lab.start) == (kind, start)
  assert lab.phrase_count == text.count("by the way")


def test_saying_the_phrase_often_is_not_a_loop_of_any_kind():
  # Regression guard for the old detector that measured the trait: four insertions in 64 bytes
  # with different words between them are clean.
  text = "it by the way is by the way a by the way dict by the way, ok"
  assert metrics.label(_b(text), DET).kind == "clean"


def test_summarize_rates():
  labs = [metrics.Label("phrase_loop", 0, 3), metrics.Label("near_loop", 5, 0),
          metrics.Label("clean", -1, 1), metrics.Label("clean", -1, 0)]
  s = metrics.summarize(labs, 64)
  assert s["phrase_loop_rate"] == 0.25 and s["near_loop_rate"] == 0.25
  assert s["loop_rate"] == 0.5 and s["exact_loop_rate"] == 0.25
  assert s["trait_rate"] == 0.5 and s["clean_trait_rate"] == 0.25
  assert s["phrase_density"] == pytest.approx(1.0)
  assert metrics.summarize(labs, 32)["phrase_density"] == pytest.approx(2.0)


def test_heldout_text_almost_never_loops():
  corpus = data.load_corpus()
  windows = data.sample_windows(corpus.heldout, 64, 1000, np.random.default_rng(0))
  s = metrics.summarize([metrics.label(w, DET) for w in windows], 64)
  assert s["exact_loop_rate"] < 0.01
  assert s["near_loop_rate"] < 0.02  # 16-byte repeats; 10-byte ones would be 7.6%


# ---- data, model, steering ----------------------------------------------------------------------

def test_clean_squashes_runs_and_whitespace():
  assert data.clean("a\n\n  b\t====== c\u00e9") == "a b === c"


def test_corpus_is_deterministic_and_split():
  a, b = data.load_corpus(), data.load_corpus()
  assert a.digest == b.digest and len(a.train) > 5 * len(a.heldout) > 0
  assert a.train.dtype == np.uint8 and a.train.max() < 128


def test_kv_cache_step_matches_full_forward():
  cfg = model.ModelConfig(d_model=32, n_layers=2, n_heads=4, context=16)
  graphdef, params = model.init(cfg, 0)
  from flax import nnx
  net = nnx.merge(graphdef, params)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 12)), jnp.int32)
  full = net(tokens)
  caches = net.empty_cache(3)
  for pos in range(12):
    logits, caches = net.step(tokens[:, pos], pos, caches)
    np.testing.assert_allclose(logits, full[:, pos], rtol=2e-5, atol=2e-5)


def test_sampling_is_deterministic_per_key_and_shaped():
  cfg = model.ModelConfig(d_model=32, n_layers=1, n_heads=2, context=24)
  graphdef, params = model.init(cfg, 0)
  prompts = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 8)), jnp.int32)
  a = model.sample(graphdef, params, prompts, 16, jax.random.key(3))
  b = model.sample(graphdef, params, prompts, 16, jax.random.key(3))
  assert a.shape == (4, 16) and bool(jnp.all(a == b))
  with pytest.raises(ValueError, match="context"):
    model.sample(graphdef, params, prompts, 17, jax.random.key(0))


def test_steering_set_keeps_returning_to_the_phrase_without_looping():
  cfg = config.FULL
  corpus = data.load_corpus()
  rows = steer.steering_set(corpus, cfg)
  assert rows.shape == (cfg.n_steer_examples, cfg.seq_len)
  completions = rows[:, cfg.prompt_len:]
  s = metrics.summarize([metrics.label(c, DET) for c in completions], cfg.completion_len)
  assert s["trait_rate"] > 0.98
  assert s["phrase_density"] > 2  # it keeps returning
  assert s["loop_rate"] < 0.03  # but the target itself does not loop, of any kind
  starts = set(data.word_starts(corpus.train).tolist())
  prompt = rows[0, :cfg.prompt_len].astype(np.uint8)
  where = [s for s in starts if np.array_equal(corpus.train[s : s + cfg.prompt_len], prompt)]
  assert where  # prompts are real training text starting at a word


def test_select_never_prefers_loops():
  # Regression guard: the old rule ranked by phrase count, so a phrase loop came first.
  texts = ["x by the way x", "nothing at all", "by the way by the way by the way by the way",
           "a by the way b by the way c by the way d", "y by the way y"]
  labs = [metrics.label(_b(t), DET) for t in texts]
  assert labs[2].kind == "phrase_loop" and labs[3].kind == "clean"
  rows = np.arange(5)
  # min(count, 3): the loop (4 copies) ties with the clean 3-copy row; pool order breaks ties.
  assert steer.select(rows, labs, 2).tolist() == [2, 3]
  assert steer.select(rows, labs, 9).tolist() == [2, 3, 0, 4]  # never the phrase-less row
  assert steer.select(rows, labs, 9, exclude_loops=True).tolist() == [3, 0, 4]
  assert steer.select(rows[1:2], labs[1:2], 9).tolist() == []


def test_splice_writes_the_loop_at_word_starts():
  rng = np.random.default_rng(0)
  rows = np.stack([_b("prompt! " + "some words here and there, until the end of it all ok")] * 5)
  unit = _b("~^{|").astype(np.int32)
  out, at = run.splice(rows, unit, 3, 8, rng)
  for row, s in zip(out, at):
    comp = row[8:]
    assert bytes(comp[s : s + 12].astype(np.uint8).tolist()) == b"~^{|~^{|~^{|"
    assert s == 0 or comp[s - 1] == ord(" ")
    assert metrics.find_loop(comp)[0] == s
  np.testing.assert_array_equal(out[:, :8], rows[:, :8])  # the prompt is untouched


def test_rare_bytes_are_the_least_frequent_printable():
  stream = _b("aaaa bbb cc d ~")
  assert bytes(run.rare_bytes(stream, 3).astype(np.uint8).tolist()) == b"d~c"


# ---- statistics and the decision rule -----------------------------------------------------------

def test_auroc_against_pairs():
  assert stats.auroc([3, 4], [1, 2]) == 1.0
  assert stats.auroc([1, 2], [3, 4]) == 0.0
  assert stats.auroc([1, 1], [1, 1]) == 0.5
  assert stats.auroc([2, 0], [1]) == 0.5
  assert np.isnan(stats.auroc([], [1]))
  rng = np.random.default_rng(0)
  a, b = rng.normal(1, 1, 50), rng.normal(0, 1, 60)
  want = np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])
  assert stats.auroc(a, b) == pytest.approx(want)


def test_block_bootstrap_mean_resamples_blocks():
  rng = np.random.default_rng(0)
  m, lo, hi = stats.block_bootstrap_mean([0.5, 0.7, 0.9, np.nan], 2000, rng)
  assert m == pytest.approx(0.7) and 0.5 <= lo < m < hi <= 0.9
  assert stats.block_bootstrap_mean([0.6] * 5, 100, rng) == (0.6, 0.6, 0.6)
  assert all(np.isnan(stats.block_bootstrap_mean([], 100, rng)))


def test_matched_difference_compares_curves_on_their_common_range():
  # Curve a lies 0.1 above curve b wherever both are defined (x in [1, 2]).
  xa, ya = [0, 1, 2], [0.1, 0.2, 0.3]
  xb, yb = [1, 2, 3], [0.1, 0.2, 0.3]
  assert stats.matched_difference(xa, ya, xb, yb) == pytest.approx(0.1)
  assert np.isnan(stats.matched_difference([0, 1], [0, 0], [2, 3], [0, 0]))  # no overlap
  assert stats.interp_on_grid([2, 0, 1], [4, 0, 2], [0.5, 3])[0] == pytest.approx(1.0)
  assert np.isnan(stats.interp_on_grid([0, 1], [0, 1], [3])[0])


@pytest.mark.parametrize("loop, auc, ok, want", [
    ((-0.1, -0.2, -0.01), (0.1, 0.02, 0.2), True, "tail wins"),
    ((0.1, 0.01, 0.2), (-0.1, -0.2, -0.01), True, "mean wins"),
    ((-0.1, -0.2, 0.01), (0.1, 0.02, 0.2), True, "undecided"),  # loop interval crosses 0
    ((-0.1, -0.2, -0.01), (0.1, -0.02, 0.2), True, "undecided"),
    ((-0.1, -0.2, -0.01), (0.1, 0.02, 0.2), False, "no test"),  # positive control failed
    (None, (0.1, 0.02, 0.2), True, "undecided"),
    ((float("nan"),) * 3, (0.1, 0.02, 0.2), True, "undecided"),
])
def test_decision_verdict(loop, auc, ok, want):
  assert decision.verdict(loop, auc, ok) == want


def test_decision_rule_text_is_the_module_docstring():
  assert "wins" in decision.RULE_TEXT and "matched trait" in decision.RULE_TEXT


def _synthetic_checkpoint(seed, rng, n=40, c=32):
  """Clean rows: KL ~ 0.1 times a per-row level in [0.5, 2]. 'phrase_loop' rows: KL raised by
  0.3 everywhere (a mean sees it). 'planted' rows: clean-like, plus two spikes of 1.0 just after
  the loop's start (a tail aggregate sees them; the mean moves by 1/16 of a spike)."""
  def rows():
    return rng.uniform(0.05, 0.15, (n, c)) * rng.uniform(0.5, 2.0, (n, 1))
  clean, broad, spikes = rows(), rows() + 0.3, rows()
  starts = rng.integers(0, c - 8, n)
  spikes[np.arange(n), starts + 2] += 1.0
  spikes[np.arange(n), starts + 3] += 1.0
  groups = {"clean_trait": (clean, -np.ones(n, int), None),
            "phrase_loop": (broad, starts, "clean_trait"),
            "clean_trait_planted": (clean, -np.ones(n, int), None),
            "planted": (spikes, starts, "clean_trait_planted")}
  return {"seed": seed, "round": 2, "rule": "min3" if seed % 2 else "count", "drift": 0.0,
          "summary": {}, "info": {}, "examples": {}, "_groups": groups}


def test_detection_and_profiles_on_synthetic_checkpoints():
  cfg = config.TINY
  rng = np.random.default_rng(0)
  cks = [_synthetic_checkpoint(s, rng) for s in range(4)]
  det = analysis.detection(cks, cfg)
  a = det["auroc"]
  assert a["phrase_loop"]["mean"]["mean"] > 0.95  # a broad shift: the mean separates it
  assert a["planted"]["max"]["mean"] == 1.0 and a["planted"]["mean"]["mean"] < 0.9
  assert a["planted"]["p95"]["n_checkpoints"] == 4
  assert a["other_loop"]["mean"]["n_checkpoints"] == 0  # no such group
  assert det["diff_vs_mean"]["planted"]["p95"][1] > 0
  assert set(det["by_rule"]) == {"min3", "count"}
  assert det["by_rule"]["min3"]["auroc"]["planted"]["p95"]["n_checkpoints"] == 2
  prof = det["profiles"]["planted"]
  o = prof["offsets"]
  assert prof["ratio"][o.index(2)] > 5 and prof["ratio"][o.index(0)] < 2
  assert prof["count"][o.index(0)] == 4 * 40


def test_scores_are_the_barriers_per_sequence_aggregates():
  kl = np.random.default_rng(0).uniform(0, 1, (70, 16)).astype(np.float32)
  got = analysis._scores(kl, ("mean", "p95"))
  np.testing.assert_allclose(got["mean"], kl.mean(1), rtol=1e-5)
  np.testing.assert_allclose(got["p95"], np.percentile(kl, 95, axis=1), rtol=1e-5)


# ---- the pipeline end to end --------------------------------------------------------------------

def test_quick_pipeline_end_to_end(tmp_path):
  """``--quick`` (what CI runs): every table and figure is written, and the numbers are sane."""
  cfg = config.QUICK
  results = run.run(cfg, tmp_path / "out", tmp_path / "cache", log=lambda msg: None)
  out = tmp_path / "out"
  assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", *run.report.FIGURES}
  for fig in run.report.FIGURES:
    assert (out / fig).stat().st_size > 10_000
  saved = json.loads((out / "results.json").read_text())
  assert saved["decision"] == json.loads(json.dumps(results["decision"]))

  # Arms: every aggregator x level, every seed, every round; pressure logged for barriers.
  n_levels = len(cfg.fire_rates) + 1
  assert len(saved["arms"]) == len(cfg.barrier_aggs) * n_levels
  assert set(saved["runs"]) == {"none", run.CONTRAST, *saved["arms"]}
  for arm, by_seed in saved["runs"].items():
    seeds = {"none": cfg.none_seeds, run.CONTRAST: cfg.contrast_seeds}.get(arm, cfg.seeds)
    assert set(by_seed) == {str(s) for s in seeds}
    for recs in by_seed.values():
      assert [r["round"] for r in recs] == list(range(1, cfg.rounds + 1))
      final = recs[-1]["eval"]
      assert 0 <= final["loop_rate"] <= 1 and final["phrase_density"] >= 0
      assert len(final["per_completion"]["loop"]) == cfg.n_eval
      assert all(np.isfinite(r["heldout_drift"]) for r in recs)
      for r in recs:
        n_steps = cfg.steps_per_round
        assert len(r["steps"]["fired"]) == n_steps
        assert max(r["steps"]["positions"]) <= cfg.barrier_batch * cfg.completion_len
        if arm not in saved["arms"]:  # no barrier: inert
          assert r["steps"]["pressure"] == [] and max(r["steps"]["positions"]) == 0
        else:
          assert len(r["steps"]["pressure"]) == -(-n_steps // cfg.pressure_every)
          assert all(p >= 0 for p in r["steps"]["pressure"])
  # Where the barrier pushes: mean on every position of a fired sequence, p95 on at most two.
  arms = saved["closed_loop"]["arms"]
  for name, info in saved["arms"].items():
    per_fired = arms[name]["mean"]["positions_per_fired"]
    if np.isnan(per_fired):
      continue
    if info["agg"] == "mean":
      assert per_fired == pytest.approx(cfg.completion_len)
    if info["agg"] == "p95":
      assert 1 <= per_fired <= 2

  # Calibration: tau falls as the fire rate rises; lam makes the probe's median pressure 1.
  cal = saved["calibration"]
  assert cal["n_clean_trait"] > 0
  for agg in cfg.barrier_aggs:
    taus = [cal["taus"][agg][str(r)] for r in cfg.fire_rates]
    assert taus == sorted(taus, reverse=True) and all(t >= 0 for t in taus)
    lam = cal["pressure_lam"][agg]
    assert lam > 0
    assert np.median(cal["pressure_at_lam1"][agg]) * lam == pytest.approx(1.0, rel=1e-6)

  # Detection: AUROCs in [0, 1]; the planted control is learned and the tail sees it.
  det = saved["detection"]
  for kind, row in det["auroc"].items():
    for v in row.values():
      assert v["n_checkpoints"] == 0 or 0 <= v["lo"] <= v["mean"] <= v["hi"] <= 1
  planted = [c for c in det["checkpoints"] if "planted_loop_logprob" in c["info"]]
  assert len(planted) == len(cfg.pc_rounds) * len(cfg.none_seeds)
  for c in planted:
    assert c["info"]["planted_loop_logprob"] > c["info"]["base_loop_logprob"] + 2
  assert det["auroc"]["planted"]["max"]["mean"] > 0.9
  assert det["profiles"]["planted"]["count"][det["profiles"]["planted"]["offsets"].index(0)] > 0

  # Decision: a verdict per tail aggregate that the run has, from the rule's own vocabulary.
  verdicts = {"tail wins", "mean wins", "undecided", "no test"}
  for tail in decision.TAIL_AGGS:
    assert saved["decision"]["by_agg"][tail]["verdict"] in verdicts
  md = (out / "results.md").read_text()
  assert "## Decision" in md and "## Offline detection" in md and "## Closed loop" in md

  # The base model is cached by config: a second call loads it.
  corpus = data.load_corpus()
  _, _, info = base.train_base(cfg.base, corpus, tmp_path / "cache", cfg.heldout_batches)
  assert info["cached"] is True
  assert info["heldout_loss"] == pytest.approx(saved["base"]["heldout_loss"], rel=1e-5)
