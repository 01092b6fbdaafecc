"""Forward-mode AD where the README promises it: the aggregators, hinge and kl_estimate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import klagg_jax as ka

CASES = {
    "mean": lambda x: ka.aggregate(x, "mean"),
    "rmse": lambda x: ka.aggregate(x, "rmse"),
    "p95": lambda x: ka.aggregate(x, "p95"),
    "soft_p95": lambda x: ka.aggregate(x, "soft_p95"),
    "cvar95": lambda x: ka.aggregate(x, "cvar95"),
    "max": lambda x: ka.aggregate(x, "max"),
    "smooth_max": lambda x: ka.aggregate(x, "smooth_max"),
    "power_mean": lambda x: ka.power_mean(x, 3.0),
    "hinge": lambda x: ka.hinge(x, 0.5, "softplus"),
    "kl_estimate": lambda x: ka.kl_estimate(x, jnp.zeros_like(x), estimator="k3"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_mode_matches_reverse_mode(name, rng):
  f = lambda x: CASES[name](x).sum()
  x = jnp.asarray(rng.uniform(0.0, 2.0, size=(3, 17)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(3, 17)), jnp.float32)
  value, tangent = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(x, t)
  reverse_value, grad = jax.jit(jax.value_and_grad(f))(x)
  np.testing.assert_allclose(value, reverse_value, rtol=1e-6)
  np.testing.assert_allclose(tangent, jnp.vdot(grad, t), rtol=1e-4, atol=1e-6)
