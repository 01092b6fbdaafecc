"""Float64 numpy truth for the divergences and aggregators, shared by tests and benchmarks.

Written independently of the JAX kernels (plain formulas, no chunking, no custom VJP) so that a
mistake in one is not repeated in the other. Never imported by the library's fast paths.
"""

from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  m = np.max(x, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _kl(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
  """sum p (log p - log q) with 0 log 0 = 0."""
  p = np.exp(lp)
  with np.errstate(invalid="ignore"):
    terms = np.where(p > 0, p * (lp - lq), 0.0)
  return terms.sum(-1)


def kl_per_position(logits, ref_logits, direction="reverse", where=None, temperature=1.0,
                    beta=0.5) -> np.ndarray:
  lp = log_softmax(np.asarray(logits, np.float64) / temperature)
  lr = log_softmax(np.asarray(ref_logits, np.float64) / temperature)
  if direction == "reverse" or (direction == "js" and beta == 1.0):
    out = _kl(lp, lr)
  elif direction == "forward" or (direction == "js" and beta == 0.0):
    out = _kl(lr, lp)
  else:
    with np.errstate(divide="ignore"):
      lm = np.log((1 - beta) * np.exp(lp) + beta * np.exp(lr))
    out = beta * _kl(lr, lm) + (1 - beta) * _kl(lp, lm)
  if where is not None:
    out = np.where(where, out, 0.0)
  return out


def _rows(x, where, axis):
  """Yields (index, valid values as float64) per output element."""
  x = np.asarray(x, np.float64)
  where = np.ones(x.shape, bool) if where is None else np.broadcast_to(where, x.shape)
  if axis is None:
    return [((), x[where])], ()
  x, where = np.moveaxis(x, axis, -1), np.moveaxis(where, axis, -1)
  out_shape = x.shape[:-1]
  return [(idx, x[idx][where[idx]]) for idx in np.ndindex(*out_shape)], out_shape


def _apply(fn, x, where=None, axis=-1):
  rows, shape = _rows(x, where, axis)
  out = np.zeros(shape, np.float64)
  for idx, v in rows:
    out[idx] = fn(v) if v.size else 0.0
  return out


def mean(x, where=None, axis=-1):
  return _apply(np.mean, x, where, axis)


def rmse(x, where=None, axis=-1, eps=1e-8):
  return _apply(lambda v: np.sqrt(np.mean(v ** 2) + eps), x, where, axis)


def maximum(x, where=None, axis=-1):
  return _apply(np.max, x, where, axis)


def quantile(x, q, where=None, axis=-1):
  return _apply(lambda v: np.percentile(v, 100 * q), x, where, axis)


def cvar(x, q, where=None, axis=-1):
  """(1 / (1 - q)) * integral_q^1 of the empirical (step) quantile function."""
  def one(v):
    v = np.sort(v)
    n = v.size
    total = 0.0
    for i in range(n):
      lo, hi = max(i / n, q), (i + 1) / n
      total += v[i] * max(hi - lo, 0.0)
    return total / (1 - q)
  return _apply(one, x, where, axis)


def smooth_max(x, temperature=1.0, where=None, axis=-1):
  def one(v):
    z = v / temperature
    m = z.max()
    return temperature * (m + np.log(np.mean(np.exp(z - m))))
  return _apply(one, x, where, axis)


def power_mean(x, p, where=None, axis=-1):
  return _apply(lambda v: np.mean(np.maximum(v, 0) ** p) ** (1 / p), x, where, axis)


def soft_quantile(x, q, where=None, axis=-1, bandwidth=1.0, grid=400001):
  """Quadrature of the linear quantile function (numpy.interp, constant beyond the ends)
  against a Gaussian on the rank axis, centred at q (n - 1), sd bandwidth sqrt(n q (1 - q))."""
  def one(v):
    v = np.sort(v)
    n = v.size
    h, sigma = q * (n - 1), bandwidth * np.sqrt(n * q * (1 - q))
    t = np.linspace(h - 12 * sigma, h + 12 * sigma, grid)
    w = np.exp(-0.5 * ((t - h) / sigma) ** 2)
    return float(np.sum(w * np.interp(t, np.arange(n), v)) / np.sum(w))
  return _apply(one, x, where, axis)


# ------------------------------------------------------------------------------------------------
# Distillation from a stored teacher: both distributions coarsened onto k stored entries + a tail.


def _masked_logsumexp(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
  """log sum_{v: keep} exp(x_v) over the last axis in float64; -inf for an empty selection."""
  x = np.where(keep, np.asarray(x, np.float64), -np.inf)
  m = np.max(x, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):
    return (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def _outside(indices: np.ndarray, vocab: int) -> np.ndarray:
  """Boolean ``[..., V]``: True at the entries a row's ``indices`` do not name."""
  indices = np.asarray(indices)
  keep = np.ones(indices.shape[:-1] + (vocab,), bool)
  np.put_along_axis(keep, indices.astype(np.int64), False, axis=-1)
  return keep


def topk_logprobs(ref_logits, k, temperature=1.0):
  """(top-k log-probs sorted decreasing, their indices, log of the mass outside them), float64."""
  lr = log_softmax(np.asarray(ref_logits, np.float64) / temperature)
  order = np.argsort(-lr, axis=-1, kind="stable")[..., :k]
  values = np.take_along_axis(lr, order, axis=-1)
  return values, order, _masked_logsumexp(lr, _outside(order, lr.shape[-1]))


def kl_topk(logits, ref_logprobs, ref_indices, ref_tail=None, direction="forward", where=None,
            temperature=1.0, beta=0.5) -> np.ndarray:
  """The divergence between student and teacher coarsened onto the k stored entries + one tail.

  Student: its log-probs at the stored entries and the log of its mass elsewhere. Teacher: the
  stored log-probs and ``ref_tail`` (else log(1 - sum exp(ref_logprobs))), renormalized over the
  k + 1 cells. With k = V both tails are empty. Then the full-vocabulary formula on k + 1 cells.
  """
  lp = log_softmax(np.asarray(logits, np.float64) / temperature)
  vocab = lp.shape[-1]
  lr = np.asarray(ref_logprobs, np.float64)
  idx = np.asarray(ref_indices).astype(np.int64)
  k = lr.shape[-1]
  student_kept = np.take_along_axis(lp, idx, axis=-1)
  if k == vocab:
    student_tail = np.full(lp.shape[:-1], -np.inf)
    teacher_tail = np.full(lp.shape[:-1], -np.inf)
  else:
    student_tail = _masked_logsumexp(lp, _outside(idx, vocab))
    if ref_tail is None:
      mass = np.exp(_masked_logsumexp(lr, np.ones(lr.shape, bool)))
      with np.errstate(divide="ignore"):
        teacher_tail = np.log(np.maximum(1.0 - mass, 0.0))
    else:
      teacher_tail = np.asarray(ref_tail, np.float64)
  student = np.concatenate([student_kept, student_tail[..., None]], axis=-1)
  teacher = np.concatenate([lr, teacher_tail[..., None]], axis=-1)
  return kl_per_position(student, teacher, direction, where=where, beta=beta)


# ------------------------------------------------------------------------------------------------
# Packed rows: an aggregator per segment.


def per_segment(fn, x, segment_ids, max_segments, where=None, **kwargs) -> np.ndarray:
  """``[..., max_segments]``: ``fn`` over the valid entries of each segment of each row of ``x``
  ``[..., T]`` (segment k in column k - 1; 0.0 for a segment with no valid entry)."""
  x = np.asarray(x, np.float64)
  seg = np.broadcast_to(np.asarray(segment_ids), x.shape)
  where = np.ones(x.shape, bool) if where is None else np.broadcast_to(where, x.shape)
  out = np.zeros(x.shape[:-1] + (max_segments,), np.float64)
  for idx in np.ndindex(*x.shape[:-1]):
    for k in range(1, max_segments + 1):
      values = x[idx][where[idx] & (seg[idx] == k)]
      out[idx + (k - 1,)] = fn(values, axis=None, **kwargs) if values.size else 0.0
  return out


def linear_topk_logprobs(hidden, weight, k, bias=None, temperature=1.0, softcap=None,
                         weight_layout="dv"):
  """:func:`topk_logprobs` of hidden @ weight + bias in float64, soft-capped first when asked
  (cap * tanh(z / cap), a -inf logit staying -inf)."""
  h, w = np.asarray(hidden, np.float64), np.asarray(weight, np.float64)
  z = h @ (w if weight_layout == "dv" else w.T)
  if bias is not None:
    z = z + np.asarray(bias, np.float64)
  if softcap is not None:
    z = np.where(z == -np.inf, z, softcap * np.tanh(z / softcap))
  return topk_logprobs(z, k, temperature)
