"""Test settings of the loops study: XLA:CPU at -O0 (the tests compile far more than they
compute, and time nothing), and silent rank promotion raises."""

import os

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
