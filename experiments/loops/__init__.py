"""Does the aggregator decide whether a KL barrier catches token loops?

A tiny byte-level transformer is trained on the standard library's docstrings, then steered
toward a narrow target under a KL barrier to the frozen base, one arm per aggregator. See
``EXPERIMENTS.md`` for the protocol and ``run.py`` for the entry point.
"""
