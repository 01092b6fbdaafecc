"""Opt-in runtime checks (check_logits, check_logprobs, check_topk): each fires on bad values and
stays silent on good ones, under jit, grad and vmap, and returns its input unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import klagg_jax as ka
from tests.helpers import random_logits

V = 11


def checked(fn):
  """fn under checkify and jit, returning (error message or None, output)."""
  run = checkify.checkify(jax.jit(fn))

  def call(*args):
    err, out = run(*args)
    return err.get(), out

  return call


@pytest.fixture
def logits(rng):
  return random_logits(rng, (2, 5, V))


# ------------------------------------------------------------------------------------------------
# check_logits


def test_check_logits_is_silent_on_logits_and_logprobs_and_returns_its_input(logits):
  kl = lambda a, b: ka.kl_per_position(ka.check_logits(a), ka.check_logits(b, name="ref_logits"))
  err, out = checked(kl)(logits, logits + 1.0)
  assert err is None
  # The same KL (0 up to rounding: logits + 1 is the same distribution); another program's
  # fusion may round differently on a GPU, so not bit for bit.
  np.testing.assert_allclose(out, ka.kl_per_position(logits, logits + 1.0), atol=1e-6)
  assert checked(kl)(jax.nn.log_softmax(logits), logits)[0] is None
  banned = logits.copy()
  banned[0, 1, :3] = -np.inf  # a banned vocabulary entry and an all -inf row are allowed
  banned[1, 2, :] = -np.inf
  assert checked(kl)(banned, logits)[0] is None
  np.testing.assert_array_equal(ka.check_logits(logits), logits)  # eagerly: no error


def test_check_logits_fires_on_probabilities_passed_as_logits(logits):
  probs = np.asarray(jax.nn.softmax(logits))
  err, _ = checked(lambda a: ka.kl_per_position(ka.check_logits(a), logits))(probs)
  assert err is not None and "looks like probabilities" in err and "[0 0]" in err
  # One such row among logits is enough, and the message names it and the argument.
  mixed = logits.copy()
  mixed[1, 3] = probs[1, 3]
  err, _ = checked(lambda a: ka.check_logits(a, name="ref_logits"))(mixed)
  assert "ref_logits at position [1 3] looks like probabilities" in err
  # Masked out, it is not checked.
  mask = np.ones((2, 5), bool)
  mask[1, 3] = False
  assert checked(lambda a, m: ka.check_logits(a, where=m))(mixed, mask)[0] is None
  # bf16 probabilities too.
  err, _ = checked(ka.check_logits)(jnp.asarray(probs, jnp.bfloat16))
  assert "looks like probabilities" in err


def test_check_logits_fires_on_nan_at_a_valid_position_only(logits):
  bad = logits.copy()
  bad[1, 4, 7] = np.nan
  err, _ = checked(ka.check_logits)(bad)
  assert "logits has a NaN at valid position [1 4]" in err
  mask = np.ones((2, 5), bool)
  mask[1, 4] = False
  assert checked(lambda a, m: ka.check_logits(a, where=m))(bad, mask)[0] is None


def test_check_logits_under_grad_and_vmap(logits):
  probs = np.asarray(jax.nn.softmax(logits))
  ref_logits = 0.5 * logits
  loss = lambda a: ka.kl_per_position(ka.check_logits(a), ref_logits).sum()
  err, g = checked(jax.grad(loss))(logits)
  assert err is None
  want = jax.grad(lambda a: ka.kl_per_position(a, ref_logits).sum())(logits)
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
  assert "looks like probabilities" in checked(jax.grad(loss))(probs)[0]
  per_seq = jax.vmap(lambda a: ka.check_logits(a).sum())
  assert checked(per_seq)(logits)[0] is None
  assert "looks like probabilities" in checked(per_seq)(probs)[0]


def test_check_logits_raises_eagerly_and_refuses_jit_without_checkify(logits):
  probs = np.asarray(jax.nn.softmax(logits))
  with pytest.raises(Exception, match="looks like probabilities"):
    ka.check_logits(probs)
  with pytest.raises(ValueError, match="checkify"):
    jax.jit(ka.check_logits)(logits)


@pytest.mark.parametrize("call, match", [
    (lambda: ka.check_logits(jnp.zeros((2, 3), jnp.int32)), "floating"),
    (lambda: ka.check_logits(jnp.zeros((2, 0))), "empty vocabulary"),
    (lambda: ka.check_logits(jnp.zeros((2, 3)), where=jnp.ones(2, jnp.int32)),
     r"\.astype\(bool\)"),
    (lambda: ka.check_logprobs(jnp.zeros(3), where=jnp.ones(4, bool)), "broadcast"),
    (lambda: ka.check_topk(jnp.zeros((2, 3)), jnp.zeros((2, 3)), vocab=5), "integer"),
    (lambda: ka.check_topk(jnp.zeros((2, 3)), jnp.zeros((2, 4), jnp.int32), vocab=5),
     "Shape mismatch"),
    (lambda: ka.check_topk(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32), vocab=0), "vocab"),
    (lambda: ka.check_topk(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32), vocab=5.0),
     "vocab"),
    (lambda: ka.check_topk(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32), jnp.zeros(3),
                           vocab=5), "ref_tail has shape"),
    (lambda: ka.check_topk(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32), vocab=5,
                           mass_atol=-1.0), "mass_atol"),
])
def test_bad_static_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# ------------------------------------------------------------------------------------------------
# check_logprobs


def test_check_logprobs(rng):
  logp = np.log(rng.uniform(1e-3, 1.0, (3, 7))).astype(np.float32)
  est = lambda a, b: ka.kl_estimate(ka.check_logprobs(a), ka.check_logprobs(b, name="ref_logp"))
  err, out = checked(est)(logp, logp - 0.5)
  assert err is None
  np.testing.assert_allclose(out, ka.kl_estimate(logp, logp - 0.5), rtol=1e-6, atol=1e-7)
  with_zero_prob = logp.copy()
  with_zero_prob[0, 0] = -np.inf
  assert checked(est)(with_zero_prob, logp)[0] is None
  positive = logp.copy()
  positive[2, 5] = 0.25
  assert "ref_logp is above 0 at valid position [2 5]" in checked(est)(logp, positive)[0]
  nan = logp.copy()
  nan[1, 1] = np.nan
  assert "logp is NaN at valid position [1 1]" in checked(est)(nan, logp)[0]
  mask = np.ones((3, 7), bool)
  mask[1, 1] = mask[2, 5] = False
  masked = lambda a, b, m: (ka.check_logprobs(a, where=m), ka.check_logprobs(b, where=m))
  assert checked(masked)(nan, positive, mask)[0] is None


# ------------------------------------------------------------------------------------------------
# check_topk


@pytest.fixture
def stored(logits):
  return ka.topk_logprobs(logits, 4)


def topk_loss(x, lp, idx, tail):
  lp, idx, tail = ka.check_topk(lp, idx, tail, vocab=V)
  return ka.kl_topk(x, lp, idx, ref_tail=tail)


def test_check_topk_is_silent_on_topk_logprobs_output(logits, stored):
  err, out = checked(topk_loss)(logits, *stored)
  assert err is None
  lp, idx, tail = stored
  np.testing.assert_allclose(out, ka.kl_topk(logits, lp, idx, ref_tail=tail), rtol=1e-6,
                             atol=1e-7)  # another program: not bit for bit on a GPU
  # 16-bit storage (the README's recommendation) and k = V (tail -inf) pass too.
  assert checked(topk_loss)(logits, lp.astype(jnp.bfloat16), idx.astype(jnp.uint16), tail)[0] \
      is None
  assert checked(topk_loss)(logits, *ka.topk_logprobs(logits, V))[0] is None
  assert checked(lambda a, b: ka.check_topk(a, b, vocab=V))(lp, idx)[0] is None  # no tail


@pytest.mark.parametrize("corrupt, match", [
    (lambda lp, idx, t: (lp, idx.at[1, 2, 3].set(V), t), "index outside [0, 11)"),
    (lambda lp, idx, t: (lp, idx.at[1, 2, 3].set(-1), t), "index outside [0, 11)"),
    (lambda lp, idx, t: (lp, idx.at[1, 2, 3].set(idx[1, 2, 0]), t), "repeats an index"),
    (lambda lp, idx, t: (lp.at[1, 2, 1].set(0.3), idx, t), "ref_logprobs is above 0"),
    (lambda lp, idx, t: (lp.at[1, 2, 1].set(jnp.nan), idx, t), "ref_logprobs has a NaN"),
    (lambda lp, idx, t: (lp.at[1, 2, 1].set(lp[1, 2, 0]), idx, t), "sum to more than 1"),
    (lambda lp, idx, t: (lp, idx, t.at[1, 2].set(0.1)), "ref_tail is NaN or above 0"),
    (lambda lp, idx, t: (lp, idx, t.at[1, 2].set(jnp.nan)), "ref_tail is NaN or above 0"),
])
def test_check_topk_fires_on_bad_values_at_valid_positions_only(logits, stored, corrupt, match):
  # Sharpen position [1, 2] so that its top entry carries most of the mass: doubling the second
  # entry's probability then pushes the stored mass above 1 + mass_atol.
  sharp = logits.copy()
  sharp[1, 2, 0] = 10.0
  lp, idx, tail = corrupt(*ka.topk_logprobs(sharp, 4))
  err, _ = checked(topk_loss)(sharp, lp, idx, tail)
  assert err is not None, match
  assert match in err and "[1 2]" in err, err
  mask = np.ones((2, 5), bool)
  mask[1, 2] = False
  masked = lambda a, b, c, m: ka.check_topk(a, b, c, vocab=V, where=m)
  assert checked(masked)(lp, idx, tail, mask)[0] is None
