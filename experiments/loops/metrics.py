"""What we measure on sampled completions: loops of three kinds, and the steered trait.

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

Kinds of loop (``label``)
-------------------------
The steered trait is a phrase, and a loop made of the phrase is the trait said too often. So
every completion gets exactly one label, checked in this order:

- ``phrase_loop``: the completion contains a loop, and none is left once every occurrence of the
  phrase is deleted (``strip_phrase``): the loop is the phrase (with a word or two) repeated.
- ``other_loop``: the completion still contains a loop after the phrase is deleted.
- ``near_loop``: no loop, but a string of at least ``near_min_len`` (16) bytes occurs twice
  without overlap in the phrase-deleted completion (``longest_repeat_pair``). 16, not 10: a
  10-byte repeat occurs in 7.6% of 64-byte held-out docstring windows (`` the UUID ``,
  `` references ``), a 16-byte one in 1.0%.
- ``clean``: none of these.

The detectors look for repetition, not for the phrase: the phrase only decides which kind a
loop is, and is deleted before the near-loop test so that saying the phrase twice (the trait) is
not a near-loop. *Clean with the trait* is a clean completion that holds the phrase.

The trait axis
--------------
``trait_count`` scores how much of the phrase a completion says without counting a loop's
copies: every loop (``find_loop``) is first collapsed to its first copy, then whole-word
occurrences of the phrase count 1 and of a fragment of it (two or more of its words in order,
``by the``, ``the way``) count their share of its words (2/3). So a loop of the phrase counts once
however many copies it has, ``by the by the`` (not a loop) counts 4/3, and ``said by the way,
and by the way`` counts 2.
The *trait density* is that score per 64 bytes of completion.

A compression ratio was tried as a second near-loop test (zlib size below the 1% quantile of
the steering target's) and dropped: on whole completions it fired on phrase-dense text (four or
five occurrences in 64 bytes), so it measured the trait again, the confound this labelling is
meant to remove.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

LABELS: tuple[str, ...] = ("phrase_loop", "other_loop", "near_loop", "clean")
"""Every completion gets exactly one of these (see the module docstring)."""

LOOP_KINDS: tuple[str, ...] = LABELS[:3]
"""The labels that count as a loop in the study's loop rate."""


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


def find_loop(tokens, *, max_n: int = 20, min_repeats: int = 3,
              min_span: int = 12) -> tuple[int, int, int] | None:
  """The earliest loop in ``tokens``: ``(start, n, copies)``, or None if there is none.

  ``start`` is the index of the first token of the first copy; among loops that start at the
  same index the smallest ``n`` wins. ``copies`` counts the whole back-to-back copies there.
  """
  x = np.asarray(tokens).ravel()
  best = None
  for n in range(1, min(max_n, len(x) // max(min_repeats, 1)) + 1):
    starts, lengths = _true_runs(x[n:] == x[:-n])
    copies = (lengths + n) // n
    ok = (copies >= min_repeats) & (copies * n >= min_span)
    if ok.any():
      i = int(np.flatnonzero(ok)[0])
      if best is None or starts[i] < best[0]:
        best = (int(starts[i]), n, int(copies[i]))
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
  return float(np.mean([phrase in _bytes(r) for r in rows]))


def phrase_count(tokens, phrase: bytes) -> int:
  """Non-overlapping occurrences of ``phrase`` in ``tokens`` (bytes)."""
  return _bytes(tokens).count(phrase)


def collapse_loops(tokens, **kwargs) -> np.ndarray:
  """``tokens`` with every loop (``find_loop``, same keywords) cut down to its first copy."""
  x = np.asarray(tokens).ravel()
  found = find_loop(x, **kwargs)
  while found is not None:
    start, n, copies = found
    x = np.concatenate([x[: start + n], x[start + n * copies :]])
    found = find_loop(x, **kwargs)
  return x


@functools.lru_cache(maxsize=None)
def _fragments(phrase: bytes) -> tuple[re.Pattern, dict[str, float]]:
  """A regex of the phrase and its fragments (2+ consecutive words), longest first, with each
  one's weight (its share of the phrase's words)."""
  words = phrase.decode("ascii").split()
  frags = {" ".join(words[i:j]): (j - i) / len(words)
           for i in range(len(words)) for j in range(i + 2, len(words) + 1)}
  if len(words) == 1:
    frags = {words[0]: 1.0}
  alts = sorted(frags, key=len, reverse=True)
  pattern = re.compile(r"(?<![A-Za-z])(?:" + "|".join(map(re.escape, alts)) + r")(?![A-Za-z])")
  return pattern, frags


def trait_count(tokens, phrase: bytes) -> float:
  """The trait score of a completion: whole-word occurrences of ``phrase`` (1 each) and of its
  fragments (their share of its words), after every loop is collapsed to one copy.

  .. math::

     \\mathrm{trait}(x) = \\sum_{m \\in \\mathrm{matches}(\\mathrm{collapse}(x))}
     \\frac{\\mathrm{words}(m)}{\\mathrm{words}(\\mathrm{phrase})}
  """
  pattern, frags = _fragments(phrase)
  text = _bytes(collapse_loops(tokens)).decode("latin-1")
  return float(sum(frags[m.group(0)] for m in pattern.finditer(text)))


def strip_phrase(tokens, phrase: bytes) -> tuple[np.ndarray, np.ndarray]:
  """Delete every occurrence of ``phrase``, with one space after it (or, failing that, before it).

  Returns ``(kept, index)``: the remaining tokens, and for each of them its index in ``tokens``
  (so a position found in ``kept`` maps back to the completion).
  """
  x = np.asarray(tokens).ravel()
  raw = _bytes(x)
  drop = np.zeros(len(x), bool)
  start = raw.find(phrase)
  while start >= 0:
    end = start + len(phrase)
    drop[start:end] = True
    if end < len(x) and raw[end] == 0x20:
      drop[end] = True
    elif start > 0 and raw[start - 1] == 0x20:
      drop[start - 1] = True
    start = raw.find(phrase, end)
  index = np.flatnonzero(~drop)
  return x[index], index


def longest_repeat_pair(tokens) -> tuple[int, int, int]:
  """Longest string that occurs twice without overlap: ``(length, first, second)`` starts.

  ``(0, 0, 0)`` when no byte repeats. Among equal lengths the earliest second copy wins.
  """
  x = np.asarray(tokens).ravel()
  best = (0, 0, 0)
  for d in range(1, len(x)):
    starts, lengths = _true_runs(x[d:] == x[:-d])
    if not len(starts):
      continue
    usable = np.minimum(lengths, d)  # copies d apart overlap beyond d tokens
    i = int(np.argmax(usable))
    cand = (int(usable[i]), int(starts[i]), int(starts[i]) + d)
    if cand[0] > best[0] or (cand[0] == best[0] > 0 and cand[2] < best[2]):
      best = cand
  return best


@dataclasses.dataclass(frozen=True)
class Detectors:
  """The thresholds of ``label`` (see the module docstring)."""

  phrase: bytes
  near_min_len: int = 16  # bytes of a repeated string that make a near-loop


@dataclasses.dataclass(frozen=True)
class Label:
  """One completion's label, where its loop starts (-1 if clean) and its trait."""

  kind: str
  start: int
  phrase_count: int
  trait_score: float = 0.0  # ``trait_count``: loops collapsed, fragments counted

  @property
  def trait(self) -> bool:
    return self.phrase_count > 0


def label(tokens, det: Detectors) -> Label:
  """The kind of ``tokens`` (one of ``LABELS``), and where its loop starts.

  The start is the first copy of the loop (mapped back from the phrase-deleted text for other
  loops), the second copy of the repeated string for a near-loop, and -1 for a clean completion.
  """
  x = np.asarray(tokens).ravel()
  count = phrase_count(x, det.phrase)
  score = trait_count(x, det.phrase)
  kept, index = strip_phrase(x, det.phrase)
  found_raw, found_kept = find_loop(x), find_loop(kept)
  if found_kept is not None:
    return Label("other_loop", int(index[found_kept[0]]), count, score)
  if found_raw is not None:
    return Label("phrase_loop", found_raw[0], count, score)
  length, _, second = longest_repeat_pair(kept)
  if length >= det.near_min_len:
    return Label("near_loop", int(index[second]), count, score)
  return Label("clean", -1, count, score)


def summarize(labels: list[Label], length: int) -> dict:
  """Rates over a set of completions: each kind, any loop, trait, clean with the trait, and the
  phrase density per 64 bytes (mean count x 64 / ``length``), and the trait density (mean
  ``trait_count`` x 64 / ``length``)."""
  n = max(len(labels), 1)
  out = {f"{k}_rate": sum(lab.kind == k for lab in labels) / n for k in LABELS}
  out["loop_rate"] = sum(lab.kind in LOOP_KINDS for lab in labels) / n
  out["exact_loop_rate"] = out["phrase_loop_rate"] + out["other_loop_rate"]
  out["trait_rate"] = sum(lab.trait for lab in labels) / n
  out["clean_trait_rate"] = sum(lab.trait and lab.kind == "clean" for lab in labels) / n
  out["phrase_density"] = float(np.mean([lab.phrase_count for lab in labels] or [0])) * 64 / length
  out["trait_density"] = float(np.mean([lab.trait_score for lab in labels] or [0])) * 64 / length
  return out


def _bytes(tokens) -> bytes:
  return bytes(np.asarray(tokens).ravel().astype(np.uint8).tolist())


def _true_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Starts and lengths of the runs of consecutive ``True`` in a 1-D bool array."""
  if mask.size == 0 or not mask.any():
    return np.zeros(0, int), np.zeros(0, int)
  padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
  edges = np.flatnonzero(np.diff(padded))
  return edges[::2], edges[1::2] - edges[::2]


def _longest_true_run(mask: np.ndarray) -> int:
  """Length of the longest run of consecutive ``True`` in a 1-D bool array."""
  _, lengths = _true_runs(mask)
  return int(lengths.max()) if lengths.size else 0
