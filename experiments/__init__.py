"""Experiments that exercise klagg_jax end to end (not part of the installed package)."""
