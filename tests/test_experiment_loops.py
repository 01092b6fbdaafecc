"""Tests of the loops experiment (experiments/loops): the loop-rate metric, and the pipeline end to end."""

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

from experiments.loops import base, config, data, metrics, model, report, run, steer  # noqa: E402


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


def test_has_loop_thresholds_are_keywords():
    x = _b("abababab")  # 4 copies of "ab", span 8
    assert not metrics.has_loop(x)
    assert metrics.has_loop(x, min_span=8)
    assert not metrics.has_loop(x, min_span=8, min_repeats=5)
    assert not metrics.has_loop(x, min_span=8, max_n=1)


def _has_loop_brute_force(x, max_n=20, min_repeats=3, min_span=12):
    """Direct reading of the definition: try every n, start and number of copies."""
    x = list(x)
    for n in range(1, max_n + 1):
        for i in range(len(x)):
            k = 1
            while x[i + k * n : i + (k + 1) * n] == x[i : i + n] and i + (k + 1) * n <= len(x):
                k += 1
            if i + n <= len(x) and k >= min_repeats and k * n >= min_span:
                return True
    return False


def test_has_loop_matches_brute_force():
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
            want = _has_loop_brute_force(x, **kwargs)
            assert metrics.has_loop(x, **kwargs) == want, (x.tolist(), kwargs)
            checked_loops += want
    assert checked_loops > 50  # the comparison saw both outcomes


def test_longest_repeat():
    assert metrics.longest_repeat(_b("xx by the way by the way by the way")) == (33, 11, 3)
    assert metrics.longest_repeat(_b("aaaa")) == (4, 1, 4)
    assert metrics.longest_repeat(_b("abcdef")) == (0, 0, 0)


def test_loop_rate_and_trait_rate_are_shares_of_rows():
    rows = np.stack([_b("ab" * 8), _b("by the way, ok. fine!"[:16]), _b("plain words here"),
                     _b("zzzzzzzzzzzzzzzz")])
    assert metrics.loop_rate(rows) == 0.5
    assert metrics.trait_rate(rows, b"by the way") == 0.25
    assert metrics.loop_rate(rows[:0]) == 0.0


def test_heldout_text_almost_never_loops():
    corpus = data.load_corpus()
    windows = data.sample_windows(corpus.heldout, 64, 1000, np.random.default_rng(0))
    assert metrics.loop_rate(windows) < 0.01


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
    net = nnx_merge(graphdef, params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 12)), jnp.int32)
    full = net(tokens)
    caches = net.empty_cache(3)
    for pos in range(12):
        logits, caches = net.step(tokens[:, pos], pos, caches)
        np.testing.assert_allclose(logits, full[:, pos], rtol=2e-5, atol=2e-5)


def nnx_merge(graphdef, params):
    from flax import nnx
    return nnx.merge(graphdef, params)


def test_sampling_is_deterministic_per_key_and_shaped():
    cfg = model.ModelConfig(d_model=32, n_layers=1, n_heads=2, context=24)
    graphdef, params = model.init(cfg, 0)
    prompts = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 8)), jnp.int32)
    a = model.sample(graphdef, params, prompts, 16, jax.random.key(3))
    b = model.sample(graphdef, params, prompts, 16, jax.random.key(3))
    assert a.shape == (4, 16) and bool(jnp.all(a == b))
    with pytest.raises(ValueError, match="context"):
        model.sample(graphdef, params, prompts, 17, jax.random.key(0))


def test_steering_set_keeps_returning_to_the_phrase():
    cfg = config.FULL
    corpus = data.load_corpus()
    rows = steer.steering_set(corpus, cfg)
    assert rows.shape == (cfg.n_steer_examples, cfg.seq_len)
    completions = rows[:, cfg.prompt_len:]
    phrase = cfg.phrase.encode()
    assert metrics.trait_rate(completions, phrase) > 0.98
    counts = [bytes(c.astype(np.uint8).tolist()).count(phrase) for c in completions]
    assert np.mean(counts) > 2  # it keeps returning
    assert metrics.loop_rate(completions) < 0.02  # but the target itself does not loop
    starts = set(data.word_starts(corpus.train).tolist())
    prompt = rows[0, :cfg.prompt_len].astype(np.uint8)
    where = [s for s in starts if np.array_equal(corpus.train[s : s + cfg.prompt_len], prompt)]
    assert where  # prompts are real training text starting at a word


def test_select_keeps_only_completions_with_the_phrase_most_first():
    texts = ["x by the way x", "nothing at all", "by the way by the way", "y by the way y"]
    comps = np.stack([_b(t.ljust(24, ".")) for t in texts])
    phrase = b"by the way"
    assert steer.select(np.arange(4), comps, phrase, 2).tolist() == [2, 0]  # 2 copies, then ties
    assert steer.select(np.arange(4), comps, phrase, 9).tolist() == [2, 0, 3]  # never row 1
    assert steer.select(np.arange(4), comps[1:2], phrase, 9).tolist() == []


def test_coherent_rounds_counts_until_first_collapse():
    assert report.coherent_rounds([0.0, 0.0, 0.05, 0.2, 0.0], 0.1) == 2
    assert report.coherent_rounds([0.0, 0.3], 0.1) == 0
    assert report.coherent_rounds([0.0, 0.1, 0.1], 0.1) == 2


# ---- the pipeline end to end --------------------------------------------------------------------

def test_pipeline_end_to_end_tiny(tmp_path):
    cfg = config.TINY
    results = run.run(cfg, tmp_path / "out", tmp_path / "cache", log=lambda msg: None)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "loops.png"}
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["runs"]) == set(cfg.arms)
    for arm, by_seed in saved["runs"].items():
        assert set(by_seed) == {str(s) for s in cfg.seeds}
        for records in by_seed.values():
            assert [r["round"] for r in records] == list(range(cfg.rounds + 1))
            for r in records:
                assert 0.0 <= r["loop_rate"] <= 1.0 and 0.0 <= r["trait_rate"] <= 1.0
                assert np.isfinite(r["heldout_loss"])
            assert records[0]["heldout_drift"] == 0.0  # round 0 is the base model
            if arm != "none":
                assert 0.0 <= records[-1]["train"]["fired"] <= 1.0
    taus = saved["calibration"]["taus"]
    assert set(taus) == set(cfg.arms) - {"none"}
    assert all(np.isfinite(t) and t >= 0 for t in taus.values())
    assert "| arm | tau |" in (out / "results.md").read_text()
    assert (out / "loops.png").stat().st_size > 10_000
    assert results["base"]["cached"] is False

    # The base model is cached by config: a second call loads it.
    corpus = data.load_corpus()
    _, _, info = base.train_base(cfg.base, corpus, tmp_path / "cache", cfg.heldout_batches)
    assert info["cached"] is True
    assert info["heldout_loss"] == pytest.approx(saved["base"]["heldout_loss"], rel=1e-5)
