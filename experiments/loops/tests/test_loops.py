"""Tests of the loops study (experiments/loops): loop labels and the trait axis, self-training
selection, the statistics and decision rule, the positive control's splice, the analysis on
synthetic units, and the pipeline end to end (quick config; tiny config run twice and
resumed)."""

import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from experiments.loops import (  # noqa: E402
    analysis, base, config, data, decision, metrics, model, report, run, stats, steer)

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


def test_collapse_loops_keeps_one_copy():
  x = _b("ok by the way by the way by the way by the way it")
  assert bytes(metrics.collapse_loops(x).tolist()) == b"ok by the way it"
  x = _b("abababababab then xyzxyzxyzxyz")
  assert bytes(metrics.collapse_loops(x).tolist()) == b"ab then xyz"
  x = _b("no loop here")
  assert metrics.collapse_loops(x).tolist() == x.tolist()


@pytest.mark.parametrize("text, want", [
    ("said by the way, and by the way it", 2.0),
    ("ok by the way by the way by the way by the way it", 1.0),  # a loop counts once
    ("go by the by the end", 4 / 3),  # fragments: 2 of the 3 words each
    ("by the by the by the by the by the ", 2 / 3),  # a loop of a fragment: once
    ("the way it is", 2 / 3),
    ("nearby thereby, the wayward way", 0.0),  # whole words only
    ("by way of the", 0.0),
])
def test_trait_count_collapses_loops_and_counts_fragments(text, want):
  assert metrics.trait_count(_b(text), PHRASE) == pytest.approx(want)
  assert metrics.label(_b(text), DET).trait_score == pytest.approx(want)


def test_summarize_rates():
  labs = [metrics.Label("phrase_loop", 0, 3, 1.0), metrics.Label("near_loop", 5, 0, 0.0),
          metrics.Label("clean", -1, 1, 2.0), metrics.Label("clean", -1, 0, 1.0)]
  s = metrics.summarize(labs, 64)
  assert s["phrase_loop_rate"] == 0.25 and s["near_loop_rate"] == 0.25
  assert s["loop_rate"] == 0.5 and s["exact_loop_rate"] == 0.25
  assert s["trait_rate"] == 0.5 and s["clean_trait_rate"] == 0.25
  assert s["phrase_density"] == pytest.approx(1.0)
  assert s["trait_density"] == pytest.approx(1.0)
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


def test_select_leaves_loops_out_only_when_asked():
  texts = ["x by the way x", "nothing at all", "by the way by the way by the way by the way",
           "a by the way b by the way c by the way d", "y by the way y"]
  labs = [metrics.label(_b(t), DET) for t in texts]
  assert labs[2].kind == "phrase_loop" and labs[3].kind == "clean"
  rows = np.arange(5)
  # The primary condition: a loop is never chosen, whatever its phrase count.
  assert steer.select(rows, labs, 9, exclude_loops=True).tolist() == [3, 0, 4]
  assert steer.select_index(labs, 1, exclude_loops=True).tolist() == [3]
  # The ablation (loops kept): min(count, 3) ties the loop (4 copies) with the clean 3-copy row,
  # and pool order puts it first.
  assert steer.select(rows, labs, 2).tolist() == [2, 3]
  assert steer.select(rows, labs, 9).tolist() == [2, 3, 0, 4]  # never the phrase-less row
  assert steer.select(rows[1:2], labs[1:2], 9).tolist() == []
  with pytest.raises(ValueError, match="rule"):
    steer.select_index(labs, 2, rule="max")


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


def test_t_interval_against_the_formula():
  v = [0.1, 0.3, 0.2, 0.6]
  got = stats.t_interval(v + [np.nan])
  m, sd = np.mean(v), np.std(v, ddof=1)
  half = 3.182446305284263 * sd / 2  # t(0.975, 3) * sd / sqrt(4)
  assert got["n"] == 4 and got["mean"] == pytest.approx(m)
  assert (got["lo"], got["hi"]) == (pytest.approx(m - half), pytest.approx(m + half))
  one = stats.t_interval([0.4])
  assert one["mean"] == 0.4 and np.isnan(one["lo"]) and one["n"] == 1
  assert stats.t_interval([])["n"] == 0


def test_welch_interval_against_the_formula():
  a, b = [1.0, 2.0, 3.0], [0.0, 0.5, 1.0, 1.5, 2.0]
  got = stats.welch_interval(a, b)
  va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 5
  df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 4)
  from scipy import stats as sps
  half = sps.t.ppf(0.975, df) * np.sqrt(va + vb)
  assert got["mean"] == pytest.approx(1.0)
  assert got["hi"] - got["mean"] == pytest.approx(half)
  assert np.isnan(stats.welch_interval([1.0], b)["lo"])


def test_line_at_interpolates_and_extends():
  assert stats.line_at([2, 0, 1], [4, 0, 2], [0.5, 3, -1]).tolist() == [1.0, 6.0, -2.0]
  assert stats.line_at([1, 1], [2, 4], [0, 5]).tolist() == [3.0, 3.0]  # one x: a constant


def test_matched_difference_on_a_common_range():
  # Curve a lies 0.2 above curve b everywhere (parallel lines).
  xa, ya = [0, 2], [0.1, 0.3]
  xb, yb = [1, 3], [0.0, 0.2]
  span = stats.common_range(xa, xb)
  assert span == (1.0, 2.0)
  assert stats.matched_difference(xa, ya, xb, yb, span) == pytest.approx(0.2)
  assert stats.common_range([0, 1], [2, 3]) is None


def test_lam_for_target_interpolates_in_log_lam():
  lams, dens = [0.1, 1.0, 10.0], [3.0, 2.0, 0.5]
  assert stats.lam_for_target(lams, dens, 2.0) == (pytest.approx(1.0), False)
  lam, clamped = stats.lam_for_target(lams, dens, 2.5)
  assert lam == pytest.approx(10 ** -0.5) and not clamped
  assert stats.lam_for_target(lams, dens, 4.0) == (0.1, True)
  assert stats.lam_for_target(lams, dens, 0.1) == (10.0, True)
  # A non-monotone pilot is read through its running minimum.
  lam, _ = stats.lam_for_target([1.0, 2.0, 4.0], [2.0, 2.5, 1.0], 1.5)
  assert lam == pytest.approx(2 ** (1 + 1 / 2))


def _ci(m, lo, hi, n=6):
  return {"mean": m, "lo": lo, "hi": hi, "n": n}


@pytest.mark.parametrize("loop, auc, ctl, want", [
    (_ci(-0.1, -0.2, -0.01), _ci(0.1, 0.02, 0.2), True, ("tail lower", "tail better",
                                                         "tail wins")),
    (_ci(0.1, 0.01, 0.2), _ci(-0.1, -0.2, -0.01), True, ("mean lower", "mean better",
                                                         "mean wins")),
    (_ci(-0.1, -0.2, 0.01), _ci(0.1, 0.02, 0.2), True, ("undecided", "tail better",
                                                        "undecided")),
    (_ci(-0.1, -0.2, -0.01), _ci(0.1, 0.02, 0.2), False, ("tail lower", "no test",
                                                          "undecided")),
    (_ci(-0.1, -0.2, -0.01, n=3), _ci(0.1, 0.02, 0.2, n=3), True, ("not matched", "no test",
                                                                   "undecided")),
    (None, _ci(0.1, 0.02, 0.2), True, ("not matched", "tail better", "undecided")),
])
def test_decision_readings_and_verdict(loop, auc, ctl, want):
  if loop is not None:
    loop = {**loop, "span": (1.0, 2.0)}
  control = {"passed": ctl}
  closed = decision.closed_loop_reading(loop)
  detect = decision.detection_reading(auc, control)
  assert (closed, detect, decision.verdict(closed, detect)) == want
  assert decision.closed_loop_reading({**_ci(-0.1, -0.2, -0.01), "span": None}) == "not matched"


def test_control_check_needs_the_graded_range_and_a_tail_advantage():
  assert decision.control_check(_ci(0.70, 0.6, 0.8), _ci(0.1, 0.05, 0.2))["passed"]
  assert not decision.control_check(_ci(0.90, 0.8, 1.0), _ci(0.1, 0.05, 0.2))["passed"]
  assert not decision.control_check(_ci(0.70, 0.6, 0.8), _ci(0.1, -0.05, 0.2))["passed"]
  assert not decision.control_check(None, None)["passed"]


def test_decision_rule_text_is_the_module_docstring():
  assert "wins" in decision.RULE_TEXT and "matched trait" in decision.RULE_TEXT
  assert "do not overlap" in decision.RULE_TEXT


def _unit(stage, name, agg, seed, loop, trait, level="t0", checkpoints=()):
  """A saved unit with just what the analysis reads."""
  steps = {"fired": [0.5], "positions": [1], "pressure": [1.0], "own_loop_share": [0.0]}
  rec = {"round": 1, "steps": steps, "chosen": {"n": 4, "loop_share": 0.0},
         "heldout_drift": 0.5, "pool": {"loop_rate": loop, "trait_density": trait}}
  ev = {k: 0.0 for k in analysis.OUTCOMES}
  ev.update(loop_rate=loop, trait_density=trait)
  last = {**rec, "round": 2, "eval": ev}
  return {"stage": stage, "seed": seed, "records": [rec, last], "checkpoints": list(checkpoints),
          "arm": {"name": name, "agg": agg, "tau": 1.0, "lam": 1.0, "level": level,
                  "select": "min3", "exclude_loops": stage != "ablation"}}


def _checkpoint(seed, rng, drift=0.5, n=40, c=32):
  """Synthetic KL: 'any_loop' rows raised by 0.3 everywhere (the mean sees it best); the
  control rows carry two spikes of 1.0 (a tail aggregate sees them best)."""
  def rows():
    return rng.uniform(0.05, 0.15, (n, c)) * rng.uniform(0.5, 2.0, (n, 1))
  clean, broad, spikes = rows(), rows() + 0.3, rows()
  starts = rng.integers(0, c - 8, n)
  spikes[np.arange(n), starts + 2] += 1.0
  spikes[np.arange(n), starts + 3] += 1.0
  aggs = ("mean", "p95", "max")
  sc = {k: analysis.scores(v, aggs) for k, v in (("c", clean), ("b", broad), ("s", spikes))}
  au = lambda p, a: stats.auroc(sc[p][a], sc["c"][a])  # noqa: E731
  prof = analysis.profile_sums(broad, starts, float(clean.mean()), (-4, 8))
  empty = {"sum": [0.0] * 12, "count": [0] * 12}
  return {"seed": seed, "round": 2, "drift": drift, "summary": {}, "examples": {},
          "n": {"clean_trait": n, "any_loop": n}, "auroc": {"any_loop": {a: au("b", a)
                                                                          for a in aggs}},
          "control": {"1": {a: au("s", a) for a in aggs}},
          "profile": {"any_loop": prof, "phrase_loop": empty, "other_loop": empty,
                      "near_loop": empty}}


def test_analysis_on_synthetic_units():
  cfg = dataclasses.replace(config.TINY, detect_aggs=("mean", "p95", "max"), seeds=(0, 1, 2),
                            target_fracs=(0.3, 0.7), pc_grades=(1.0,), profile_window=(-4, 8))
  rng = np.random.default_rng(0)
  units = {}
  for s in range(5):
    ck = [_checkpoint(s, rng), _checkpoint(s, rng, drift=2.0)]
    # p95's loop rate is 0.1 above mean's at every trait level; curves overlap on [1, 2].
    for name, agg, lvl, loop, trait, cks in (
        ("none", None, "-", 0.05, 3.0, ck[1:]), ("mean@t0", "mean", "t0", 0.10, 2.0, ck[:1]),
        ("mean@t1", "mean", "t1", 0.00, 1.0, []), ("p95@t0", "p95", "t0", 0.25, 2.5, []),
        ("p95@t1", "p95", "t1", 0.15 + 0.001 * s, 1.5, [])):
      units[f"main/{name}/seed{s}"] = _unit("main", name, agg, s, loop, trait, lvl, cks)
  for s in (100, 101, 102):
    units[f"ablation/p95@t0+loops/seed{s}"] = _unit("ablation", "p95@t0+loops", "p95", s,
                                                    0.45, 2.9)
  an = analysis.analyse({"units": units}, cfg)
  m = an["closed_loop"]["matched"]["p95"]
  assert m["span"] == (pytest.approx(1.5), pytest.approx(2.0)) and m["n"] == 5
  assert m["mean"] == pytest.approx(0.1 + 0.001 * 2 * 0.5, abs=2e-3)
  assert m["per_seed"]["0"] == pytest.approx(0.1 + 0.0, abs=1e-2)
  vn = an["closed_loop"]["versus_none"]["p95@t0"]["loop_rate"]
  assert vn["mean"] == pytest.approx(0.2)
  ab = an["ablation"]["p95@t0+loops"]
  assert ab["primary_arm"] == "p95@t0"
  assert ab["versus_primary"]["loop_rate"]["mean"] == pytest.approx(0.2)
  det = an["detection"]
  low = det["low_drift_barrier"]
  assert low["n_checkpoints"] == 5 and det["no_barrier"]["n_checkpoints"] == 5
  assert low["groups"]["any_loop"]["auroc"]["mean"]["mean"] > 0.95  # a broad shift
  assert low["groups"]["any_loop"]["diff_vs_mean"]["p95"]["n"] == 5  # one value per seed
  assert low["control"]["1"]["diff_vs_mean"]["max"]["lo"] > 0  # the spikes: a tail sees them
  assert det["control_grade"] == "1"
  prof = det["all"]["profiles"]["any_loop"]
  assert prof["count"][prof["offsets"].index(0)] == 10 * 40
  dec = analysis.decide(an)
  assert dec["by_agg"]["p95"]["closed_loop"] == "mean lower"
  assert dec["by_agg"]["p95"]["verdict"] in {"mean wins", "undecided"}


def test_scores_are_the_barriers_per_sequence_aggregates():
  kl = np.random.default_rng(0).uniform(0, 1, (70, 16)).astype(np.float32)
  got = analysis.scores(kl, ("mean", "p95"))
  np.testing.assert_allclose(got["mean"], kl.mean(1), rtol=1e-5)
  np.testing.assert_allclose(got["p95"], np.percentile(kl, 95, axis=1), rtol=1e-5)


# ---- the pipeline end to end --------------------------------------------------------------------

def _strip_timing(x):
  if isinstance(x, dict):
    return {k: _strip_timing(v) for k, v in x.items() if k != "timing"}
  if isinstance(x, list):
    return [_strip_timing(v) for v in x]
  return x


def test_tiny_runs_are_identical_and_resume(tmp_path):
  """The tiny config twice gives the same JSON apart from timings; a partial report covers the
  units saved; a run that lost units recomputes only those and gives the same JSON again;
  another config is refused."""
  cfg, cache = config.TINY, tmp_path / "cache"
  quiet = lambda msg: None  # noqa: E731
  run.run(cfg, tmp_path / "a", cache, log=quiet)
  run.run(cfg, tmp_path / "b", cache, log=quiet)
  a = json.loads((tmp_path / "a" / "results.json").read_text())
  b = json.loads((tmp_path / "b" / "results.json").read_text())
  assert _strip_timing(a) == _strip_timing(b)
  lost = tmp_path / "a" / "units" / "main" / "p95@t0" / "seed1.json"
  lost.unlink()
  part = run.run(cfg, tmp_path / "a", cache, log=quiet, partial=True)  # computes nothing
  assert part["partial"] and part["missing_units"] == ["main/p95@t0/seed1"]
  assert not lost.exists() and "Partial run" in (tmp_path / "a" / "results.md").read_text()
  logs = []
  run.run(cfg, tmp_path / "a", cache, log=logs.append)
  assert lost.exists() and any(msg.startswith("resuming") for msg in logs)
  assert _strip_timing(json.loads((tmp_path / "a" / "results.json").read_text())) == \
      _strip_timing(a)
  with pytest.raises(ValueError, match="another config"):
    run.run(dataclasses.replace(cfg, n_eval=8), tmp_path / "a", cache, log=quiet)
  # The corpus digest is checked when results are loaded.
  a["corpus"]["digest"] = "0" * 64
  (tmp_path / "a" / "results.json").write_text(json.dumps(a))
  with pytest.raises(ValueError, match="corpus digest"):
    report.load(tmp_path / "a")


def test_quick_pipeline_end_to_end(tmp_path):
  """``--quick`` (what CI runs): every table and figure is written, and the numbers are sane."""
  cfg = config.QUICK
  results = run.run(cfg, tmp_path / "out", tmp_path / "cache", log=lambda msg: None)
  out = tmp_path / "out"
  assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "units",
                                              *report.FIGURES}
  for fig in report.FIGURES:
    assert (out / fig).stat().st_size > 10_000
  saved = json.loads((out / "results.json").read_text())
  assert saved["decision"] == json.loads(json.dumps(results["decision"]))
  assert saved["env"]["python"] and saved["env"]["jax"] and saved["git"]["commit"]
  assert saved["corpus"]["digest"] == data.load_corpus().digest

  # Units: the pilot, every primary arm x seed, the ablation; every round; logs per step.
  n_main = 1 + len(cfg.barrier_aggs) * len(cfg.target_fracs)
  stages = [u["stage"] for u in saved["units"].values()]
  assert stages.count("pilot") == 1 + sum(len(cfg.lams(a)) for a in cfg.barrier_aggs)
  assert stages.count("main") == n_main * len(cfg.seeds)
  assert stages.count("ablation") == len(cfg.barrier_aggs) * len(cfg.ablation_seeds)
  for u in saved["units"].values():
    recs = u["records"]
    assert [r["round"] for r in recs] == list(range(1, cfg.rounds + 1))
    final = recs[-1]["eval"]
    assert 0 <= final["loop_rate"] <= 1 and final["trait_density"] >= 0
    assert len(final["per_completion"]["loop"]) == cfg.n_eval
    for r in recs:
      assert len(r["steps"]["fired"]) == len(r["steps"]["own_loop_share"]) == \
          cfg.steps_per_round
      if u["arm"]["exclude_loops"]:  # the primary condition never trains on a loop
        assert r["chosen"]["loop_share"] == 0 and max(r["steps"]["own_loop_share"]) == 0
      if u["arm"]["agg"] is None:  # no barrier: inert
        assert r["steps"]["pressure"] == [] and max(r["steps"]["positions"]) == 0
    if u["stage"] == "main":
      assert [c["round"] for c in u["checkpoints"]] == list(cfg.detect_rounds)
      assert u["seed"] in cfg.seeds
    if u["stage"] == "ablation":
      assert u["seed"] in cfg.ablation_seeds and not u["arm"]["exclude_loops"]

  # The design: one lam per aggregator and target, from the pilot.
  plan = saved["design"]
  for agg in cfg.barrier_aggs:
    assert len(plan["lams"][agg]) == len(cfg.target_fracs)
    assert all(min(cfg.lams(agg)) <= lam <= max(cfg.lams(agg)) for lam in plan["lams"][agg])

  # Detection: AUROCs in [0, 1], one value per seed; the control is graded.
  det = saved["analysis"]["detection"]
  for ck in det["checkpoints"]:
    for row in [*ck["auroc"].values(), *ck["control"].values()]:
      assert all(np.isnan(v) or 0 <= v <= 1 for v in row.values())
  ctl = det["all"]["control"]
  assert set(ctl) <= {f"{g:g}" for g in (0.0, *cfg.pc_grades)} and ctl
  # Moving further toward the planted copy makes the loop easier to see.
  top = f"{max(cfg.pc_grades):g}"
  assert ctl[top]["auroc"]["max"]["mean"] > ctl["0"]["auroc"]["max"]["mean"]

  verdicts = {"tail wins", "mean wins", "undecided"}
  for tail in decision.TAIL_AGGS:
    assert saved["decision"]["by_agg"][tail]["verdict"] in verdicts
  md = (out / "results.md").read_text()
  assert "## Decision" in md and "## Detection" in md and "## Closed loop" in md
  assert "## Ablation" in md

  # The base model is cached by config: a second call loads it.
  corpus = data.load_corpus()
  _, _, info = base.train_base(cfg.base, corpus, tmp_path / "cache", cfg.heldout_batches)
  assert info["cached"] is True
  assert info["heldout_loss"] == pytest.approx(saved["base"]["heldout_loss"], rel=1e-5)
