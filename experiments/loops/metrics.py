"""What we measure on sampled completions: loops and the steered trait.

Loop, precisely
---------------
A completion (a sequence of tokens) *contains a loop* when some n-gram occurs at least
``min_repeats`` times back to back, with ``1 <= n <= max_n``, and those back-to-back copies
cover at least ``min_span`` tokens. Formally: there are ``n`` in ``[1, max_n]``, a start ``i``
and ``k >= min_repeats`` with ``k * n >= min_span`` such that
``x[i + j*n : i + (j+1)*n] == x[i : i+n]`` for every ``j < k``. Only whole copies count (a
partial last copy adds nothing), and the copies must be adjacent (no gap between them).

With the defaults (``max_n=20``, ``min_repeats=3``, ``min_span=12``) on bytes: ``"ab"`` six
times, ``"the "`` three times, a 12-byte phrase three times are loops; ``"..."``, a word said
twice, or a 20-byte phrase twice are not. The corpus has every single-byte run squashed to three
bytes, so the held-out text itself has a loop rate of (near) zero under this definition; the
experiment reports that number as a check.

The *loop rate* of a set of completions is the share of them that contain a loop.
The *trait rate* is the share that contain the target phrase (bytes, exact match).
"""

from __future__ import annotations

import numpy as np


def longest_repeat(tokens, max_n: int = 20) -> tuple[int, int, int]:
    """Longest back-to-back repetition in ``tokens``: ``(span, n, copies)``, or ``(0, 0, 0)``.

    ``span = n * copies`` counts whole copies of one n-gram (``n <= max_n``) placed back to
    back, ``copies >= 2``. Among equal spans the smallest ``n`` wins.
    """
    x = np.asarray(tokens).ravel()
    best = (0, 0, 0)
    for n in range(1, min(max_n, len(x) // 2) + 1):
        same = x[n:] == x[:-n]  # same[j]: x[j] == x[j + n]
        run = _longest_true_run(same)
        copies = (run + n) // n  # a run of m matches covers m + n periodic tokens
        if copies >= 2 and copies * n > best[0]:
            best = (copies * n, n, copies)
    return best


def has_loop(tokens, *, max_n: int = 20, min_repeats: int = 3, min_span: int = 12) -> bool:
    """Whether ``tokens`` contains a loop, as defined in this module's docstring."""
    x = np.asarray(tokens).ravel()
    for n in range(1, min(max_n, len(x) // max(min_repeats, 1)) + 1):
        same = x[n:] == x[:-n]
        copies = (_longest_true_run(same) + n) // n
        if copies >= min_repeats and copies * n >= min_span:
            return True
    return False


def loop_rate(completions, **kwargs) -> float:
    """Share of rows of ``completions [B, T]`` that contain a loop (``has_loop`` kwargs)."""
    rows = np.asarray(completions)
    if rows.shape[0] == 0:
        return 0.0
    return float(np.mean([has_loop(r, **kwargs) for r in rows]))


def trait_rate(completions, phrase: bytes) -> float:
    """Share of rows of ``completions [B, T]`` (byte tokens) that contain ``phrase``."""
    rows = np.asarray(completions)
    if rows.shape[0] == 0:
        return 0.0
    return float(np.mean([phrase in bytes(r.astype(np.uint8).tolist()) for r in rows]))


def _longest_true_run(mask: np.ndarray) -> int:
    """Length of the longest run of consecutive ``True`` in a 1-D bool array."""
    if mask.size == 0 or not mask.any():
        return 0
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return int((edges[1::2] - edges[::2]).max())
