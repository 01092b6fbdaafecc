"""The kernel layer: one package per op, each with the same modules.

* ``base``: the op's static ``Spec`` and its block math on ``[rows, V]`` float32 blocks.
* ``xla``: the plain differentiable composition (the path for forward-mode AD), written from the
  math alone: it imports nothing of the kernels.
* ``chunked``: the memory-bounded kernel, a custom VJP over :mod:`klagg_jax._chunked`'s row-block
  loop, built with :func:`klagg_jax._ops.rows.row_kernel`.
* ``api``: validation, the default mask, the logit transform (soft-cap, then temperature), the
  sharding wrapper, and ``IMPLEMENTATIONS``: the op's implementations by name, dispatched by
  :mod:`klagg_jax._ops.registry`.

Shared by all ops: :mod:`~klagg_jax._ops.transform` (the logit transform and its derivative),
:mod:`~klagg_jax._ops.rows` (the custom-VJP scaffold), :mod:`~klagg_jax._ops.registry`,
:mod:`~klagg_jax._ops.compiled` (every public function runs as one cached ``jax.jit``).
"""
