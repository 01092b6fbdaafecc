"""Test settings of the loops study: silent rank promotion raises.

Unlike the library's suite, the study's tests keep XLA:CPU's default optimization level: the
pipeline tests spend their time computing, not compiling."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
