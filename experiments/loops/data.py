"""Text data: the standard library's own docstrings, as bytes.

The corpus is gathered at run time from a fixed list of standard-library modules, in a fixed
order, so no download is ever needed. Each docstring is cleaned into one line of printable
ASCII (whitespace collapsed, runs of one character squashed to at most three, so the corpus
itself holds no long single-byte run), then whole docstrings are split between train and
held-out by index. Tokens are bytes (vocabulary 256).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import re
import warnings

import numpy as np

VOCAB_SIZE = 256
"""Byte-level vocabulary."""

DOC_SEPARATOR = "\n"
"""Byte between two docstrings in the joined corpus (never inside a cleaned docstring)."""

# Pure-Python, import-safe modules (no side effects, no platform-only ones), in this order.
MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "email", "enum", "filecmp",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
    "heapq", "hmac", "html", "http.client", "http.cookiejar", "http.server", "imaplib",
    "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox", "mimetypes",
    "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pickletools", "pkgutil",
    "platform", "plistlib", "poplib", "pprint", "queue", "quopri", "random", "re", "sched",
    "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zipimport",
)

_RUN = re.compile(r"(.)\1{3,}")


def clean(doc: str) -> str:
    """One docstring -> one line of printable ASCII.

    Whitespace runs become one space, other non-printable or non-ASCII characters are dropped,
    and any run of four or more copies of one character is squashed to three.
    """
    text = " ".join(doc.split())
    text = "".join(c for c in text if " " <= c <= "~")
    return _RUN.sub(r"\1\1\1", text)


def _members(module) -> list:
    """Public classes, functions and methods defined in ``module``, in a fixed order."""
    out = []
    for name in sorted(vars(module)):
        if name.startswith("_"):
            continue
        obj = vars(module)[name]
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        out.append(obj)
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if not attr.startswith("_") and inspect.isfunction(member):
                    out.append(member)
    return out


def gather_docstrings(modules: tuple[str, ...] = MODULES, min_chars: int = 40) -> list[str]:
    """Cleaned, de-duplicated docstrings of ``modules``, in a fixed order.

    Order: modules as listed; within one, the module docstring, then members sorted by name
    (a class is followed by its own methods, sorted). Docstrings shorter than ``min_chars``
    after cleaning, and repeats of an earlier one, are skipped. A module that cannot be
    imported on this interpreter is skipped.
    """
    docs, seen = [], set()
    for name in modules:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except ImportError:
            continue
        for obj in [module, *_members(module)]:
            raw = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
            if not raw:
                continue
            text = clean(raw)
            if len(text) >= min_chars and text not in seen:
                seen.add(text)
                docs.append(text)
    return docs


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Train and held-out byte streams (uint8), docstrings joined by ``DOC_SEPARATOR``."""

    train: np.ndarray
    heldout: np.ndarray
    n_docs: int
    digest: str  # sha256 of the joined text: part of the cache key of anything trained on it


def load_corpus(heldout_every: int = 10) -> Corpus:
    """The docstring corpus, with every ``heldout_every``-th docstring held out (index 0, 10, ...)."""
    docs = gather_docstrings()
    train = DOC_SEPARATOR.join(d for i, d in enumerate(docs) if i % heldout_every)
    heldout = DOC_SEPARATOR.join(d for i, d in enumerate(docs) if not i % heldout_every)
    digest = hashlib.sha256((train + "\0" + heldout).encode("ascii")).hexdigest()
    return Corpus(
        train=encode(train), heldout=encode(heldout), n_docs=len(docs), digest=digest
    )


def encode(text: str) -> np.ndarray:
    """ASCII text -> uint8 tokens."""
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8).copy()


def decode(tokens) -> str:
    """Tokens (any int array) -> text; bytes outside printable ASCII show as '?'."""
    raw = bytes(int(t) & 0xFF for t in np.asarray(tokens).ravel())
    return "".join(chr(b) if 32 <= b < 127 or b == 10 else "?" for b in raw)


def word_starts(stream: np.ndarray) -> np.ndarray:
    """Indices just after a space: where a window may begin without cutting a word."""
    return np.flatnonzero(stream[:-1] == ord(" ")) + 1


def sample_windows(
    stream: np.ndarray, length: int, count: int, rng: np.random.Generator
) -> np.ndarray:
    """``count`` windows of ``length`` bytes of ``stream`` starting at word starts, ``[count, length]``."""
    starts = word_starts(stream)
    starts = starts[starts + length <= len(stream)]
    picks = rng.choice(starts, size=count, replace=count > len(starts))
    return np.stack([stream[s : s + length] for s in picks]).astype(np.int32)


def lm_batch(stream: np.ndarray, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """Random contiguous windows for language modelling, ``[batch, length + 1]`` int32."""
    starts = rng.integers(0, len(stream) - length - 1, size=batch)
    return np.stack([stream[s : s + length + 1] for s in starts]).astype(np.int32)
