"""Operator (spectral) norms of the linear maps of a network, with certified upper bounds.

For each map A the result carries an `estimate` and a sound `upper` (>= ||A||_2):

  * dense `x -> x W`: float64 SVD of the kernel; exact (`upper` adds a 1e-10 relative
    margin for float64 rounding). A dense map applied at every position of a feature
    map is block diagonal with identical blocks: same norm.
  * conv (2-D, NHWC, the whole map at the layer's input size, with its strides, padding
    and feature groups): when the input or output has at most `exact_max_dim` entries
    (and the matrix fits in 1 GiB), the explicit matrix (the conv or its transpose
    applied to the smaller side's unit vectors, in chunks; each entry is one kernel
    weight, so it is exact) and a float64 eigvalsh of its smaller Gram matrix; otherwise
    (unless `estimate=False`, which skips it) Lanczos
    on A^T A through the conv and its transpose (`jax.linear_transpose`), at most
    `num_iters` steps, stopping at Ritz residual <= `tol` x the eigenvalue (a Ritz value:
    never above ||A||^2, up to float32 rounding). Lanczos reaches ~1e-7 relative in ~60
    steps where power iteration stalls near 1e-4 on the clustered top spectrum of convs.
    The certified `upper` is the minimum of
      - the circulant bound: zero padding embeds the input in a torus of size
        N >= H + max(pad_lo, pad_hi) (and N > (H_out - 1) * stride) on which the conv is
        a block-circulant C; A = S C E with E an isometric embedding and S a selection
        of distinct output rows (the stride), so ||A|| <= ||C|| = max over the N1 x N2
        frequencies of the spectral norm of the kernel's (Cin x Cout) symbol, per feature
        group (Sedghi, Gupta & Long 2019). Exact for circular padding with stride 1.
        Computed in float64 on single-threaded BLAS: small symbols by batched eigvalsh;
        large ones (>= 64 rows) certified by Cholesky factorizations of mu I - G
        against the exact top eigenvalue of the likeliest frequencies (`_TopEigenvalue`),
        at most ~1e-9 relative above the exact maximum.
      - the patch bound: A = (I (x) K^T) P with P the im2col map, a 0/1 matrix with one
        1 per row, so ||P||^2 = c, the largest number of (output, tap) pairs reading one
        input pixel, and ||A|| <= sqrt(c) max_groups ||K_g||_2 (K_g the `[kh kw Cin/g,
        Cout/g]` reshaped kernel).
      - the exact value (+1e-10 relative) when the explicit matrix was formed.
  * avg pooling (count_include_pad): a depthwise conv with the constant kernel
    1/(kh kw), handled as above on one channel; global average over P positions:
    exactly 1/sqrt(P).
  * max pooling (not linear): its l2 Lipschitz constant is exactly sqrt(c), c the largest
    number of windows containing one input pixel (1 without overlap).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lipnorm.lipschitz import model_info
from lipnorm.lipschitz.spectral import HIGHEST, lanczos
from lipnorm.models import structure as st

Path = tuple[str, ...]
F64_MARGIN = 1e-10     # relative margin on float64 SVD / eigvalsh results
DEFAULT_EXACT_MAX_DIM = 512


@dataclasses.dataclass(frozen=True)
class OperatorNorm:
  """The spectral norm of one linear map (or the Lipschitz constant of a max pool).

  estimate: best value (exact when `exact`; else a Lanczos estimate from below).
  upper: certified upper bound >= the true norm (what sound bounds multiply).
  exact: `estimate` is the exact norm (to float64 precision).
  method: "svd", "explicit", "lanczos", "closed_form", or "none" (estimate skipped).
  iterations, rel_change: of the Lanczos iteration (0 otherwise).
  input_shape: the map's input `[H, W, C]` or `[D]` (one example).
  notes: how `upper` was obtained.
  converged: the Lanczos iteration met its tolerance (True for non-iterative methods).
  vector: the top right singular vector `[H, W, C]` Lanczos found (float32; None
    otherwise): pass it back as `start` (`start_vectors` of `layer_operator_norms`) at
    the next probe of slowly changing weights to converge in a few steps.
  """
  path: Path
  kind: str
  estimate: float
  upper: float
  exact: bool
  method: str
  iterations: int = 0
  rel_change: float = 0.0
  input_shape: tuple = ()
  notes: str = ""
  converged: bool = True
  vector: Optional[np.ndarray] = dataclasses.field(default=None, compare=False, repr=False)


# ---------------------------------------------------------------------------- dense

def dense_operator_norm(kernel, path: Path = (), input_shape: tuple = ()) -> OperatorNorm:
  """`||W||_2` of a dense kernel `[in, out]` by float64 SVD (exact)."""
  k = np.asarray(kernel, np.float64)
  k = k.reshape(-1, k.shape[-1])
  s = float(np.linalg.svd(k, compute_uv=False)[0]) if k.size else 0.0
  return OperatorNorm(path, "dense", s, s * (1 + F64_MARGIN), True, "svd",
                      input_shape=tuple(input_shape), notes="float64 SVD of the kernel")


# ----------------------------------------------------------------------------- conv

def _pairs(padding, n: int) -> Union[str, list[tuple[int, int]]]:
  """Flax conv padding -> "SAME" / "VALID" / "CIRCULAR" or explicit (lo, hi) pairs."""
  if isinstance(padding, str):
    p = padding.upper()
    if p not in ("SAME", "VALID", "CIRCULAR"):
      raise ValueError(f"conv padding={padding!r}; supported: 'SAME', 'VALID', 'CIRCULAR', "
                       "an int or (lo, hi) pairs")
    return p
  if isinstance(padding, int):
    return [(padding, padding)] * n
  pads = []
  for p in padding:
    pads.append((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])))
  if len(pads) != n:
    raise ValueError(f"conv padding={padding!r} must have {n} entries")
  return pads


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
  """A 2-D conv's geometry at one input size (NHWC / HWIO)."""
  in_hw: tuple[int, int]
  kernel_hw: tuple[int, int]
  strides: tuple[int, int]
  pads: tuple[tuple[int, int], tuple[int, int]]
  circular: bool
  out_hw: tuple[int, int]

  @staticmethod
  def make(in_hw, kernel_hw, strides, padding) -> "ConvGeometry":
    in_hw, kernel_hw = tuple(map(int, in_hw)), tuple(map(int, kernel_hw))
    strides = (strides, strides) if isinstance(strides, int) else tuple(map(int, strides))
    if len(in_hw) != 2 or len(kernel_hw) != 2 or len(strides) != 2:
      raise ValueError(f"only 2-D convs are supported (input {in_hw}, kernel {kernel_hw}, "
                       f"strides {strides})")
    p = _pairs(padding, 2)
    circular = p == "CIRCULAR"
    if circular:
      # flax: wrap-pad by k - 1 split as SAME would, then VALID
      pads = [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel_hw]
    elif isinstance(p, str):
      pads = jax.lax.padtype_to_pads(in_hw, kernel_hw, strides, p)
    else:
      pads = p
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    out_hw = tuple((h + lo + hi - k) // s + 1
                   for h, (lo, hi), k, s in zip(in_hw, pads, kernel_hw, strides))
    if min(out_hw) < 1:
      raise ValueError(f"conv with kernel {kernel_hw}, padding {pads} on input {in_hw} has "
                       "an empty output")
    return ConvGeometry(in_hw, kernel_hw, strides, pads, circular, out_hw)


def conv_apply(kernel: jax.Array, x: jax.Array, geom: ConvGeometry,
               feature_group_count: int = 1) -> jax.Array:
  """The linear conv map (no bias) on one example `x` `[H, W, Cin]` -> `[Ho, Wo, Cout]`."""
  x = x[None]
  if geom.circular:
    x = jnp.pad(x, ((0, 0), *geom.pads, (0, 0)), mode="wrap")
    pads = ((0, 0), (0, 0))
  else:
    pads = geom.pads
  y = jax.lax.conv_general_dilated(x, kernel, geom.strides, pads,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=feature_group_count,
                                   precision=HIGHEST)
  return y[0]


def _axis_count(n: int, k: int, s: int, lo: int, n_out: int, circular: bool) -> int:
  """Largest number of (output o, tap t) pairs with o*s + t - lo hitting one input index."""
  counts = np.zeros(n, np.int64)
  for o in range(n_out):
    for t in range(k):
      i = o * s + t - lo
      if circular:
        counts[i % n] += 1
      elif 0 <= i < n:
        counts[i] += 1
  return int(counts.max()) if n else 0


def window_overlap(geom: ConvGeometry) -> int:
  """c = max over input pixels of the number of (output, tap) pairs that read it."""
  return math.prod(_axis_count(n, k, s, lo, no, geom.circular)
                   for n, k, s, (lo, _), no in zip(geom.in_hw, geom.kernel_hw, geom.strides,
                                                   geom.pads, geom.out_hw))


def _group_blocks(kernel: np.ndarray, groups: int) -> np.ndarray:
  """`[kh, kw, Cin/g, Cout]` -> `[g, kh, kw, Cin/g, Cout/g]` (group j: outputs j-th slice)."""
  kh, kw, cin_g, cout = kernel.shape
  return np.moveaxis(kernel.reshape(kh, kw, cin_g, groups, cout // groups), 3, 0)


_BLAS_LOCK = threading.Lock()
_BLAS_DEPTH = [0, None]     # active `_blas_threads` users, the threadpoolctl limiter


@contextlib.contextmanager
def _blas_threads():
  """Limits NumPy's BLAS/LAPACK to one thread (when threadpoolctl is installed; it is
  optional): the many small stacked products below ran ~20x slower with BLAS threads
  contending for a busy machine's cores. Parallelism comes from threads over layers
  instead (`layer_operator_norms(workers=...)`). Re-entrant and thread-safe: the limit
  is set by the first user and lifted by the last."""
  with _BLAS_LOCK:
    if _BLAS_DEPTH[0] == 0:
      try:
        from threadpoolctl import threadpool_limits
        _BLAS_DEPTH[1] = threadpool_limits(1, user_api="blas")
      except ImportError:
        _BLAS_DEPTH[1] = None
    _BLAS_DEPTH[0] += 1
  try:
    yield
  finally:
    with _BLAS_LOCK:
      _BLAS_DEPTH[0] -= 1
      if _BLAS_DEPTH[0] == 0 and _BLAS_DEPTH[1] is not None:
        _BLAS_DEPTH[1].restore_original_limits()
        _BLAS_DEPTH[1] = None


def _gram_margin(n: int) -> float:
  """Relative float64 margin on lambda_max of an n x n Gram matrix formed, factored or
  eigendecomposed in float64: backward errors of the product, Cholesky and eigvalsh are
  each below ~n eps ||G||; 8 n^2 eps covers their sum with room (plus F64_MARGIN)."""
  return F64_MARGIN + 8 * n * n * np.finfo(np.float64).eps


def _grams(flat: np.ndarray) -> np.ndarray:
  """`[F, a, b]` -> the smaller Gram matrices `[F, n, n]`, n = min(a, b)."""
  if flat.shape[1] <= flat.shape[2]:
    return flat @ np.conj(np.swapaxes(flat, -1, -2))
  return np.conj(np.swapaxes(flat, -1, -2)) @ flat


def _lambda_max(gram: np.ndarray) -> float:
  return float(np.linalg.eigvalsh(gram)[-1])


def _cholesky_failures(mats: np.ndarray) -> list[int]:
  """Indices f whose float64 Cholesky factorization of `mats[f]` fails (not positive
  definite up to the rounding covered by `_gram_margin`); batched, halving the batch
  only where one fails."""
  try:
    np.linalg.cholesky(mats)
    return []
  except np.linalg.LinAlgError:
    if mats.shape[0] == 1:
      return [0]
  half = mats.shape[0] // 2
  return _cholesky_failures(mats[:half]) + [half + i for i in
                                            _cholesky_failures(mats[half:])]


def _rayleigh(grams: np.ndarray, steps: int, rng: np.random.Generator) -> np.ndarray:
  """`[F]` Rayleigh quotients of Hermitian PSD `grams` `[F, n, n]` after `steps` batched
  power steps (each a lower bound on lambda_max(grams[f]))."""
  v = rng.standard_normal((grams.shape[0], grams.shape[1], 1)).astype(grams.dtype)
  for _ in range(steps):
    v = grams @ v
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
  return np.real(np.conj(np.swapaxes(v, 1, 2)) @ grams @ v)[:, 0, 0]


class _TopEigenvalue:
  """Certified max over many matrices M_f of lambda_max(G_f), G_f = the smaller Gram
  matrix of M_f (so sigma_max(M_f)^2), without an eigendecomposition of each. The
  matrices come from `make(start, stop)` (chunks of a range of `count`, so memory is
  bounded):
    1. batched power steps give Rayleigh quotients r_f <= lambda_max(G_f);
    2. the few G_f with the largest r_f get an exact eigvalsh: `lower`, a true
       lambda_max of one of them;
    3. every G_f is certified <= mu = lower (1 + slack) by a float64 Cholesky
       factorization of mu I - G_f (it succeeds iff mu I - G_f is positive definite,
       i.e. lambda_max(G_f) < mu, up to rounding); the rare ones that fail (lambda_max
       above mu) get their own eigvalsh, which raises `lower`.
  `value()`: the largest mu used or eigenvalue computed, times the rounding margin of
  `_gram_margin`. So it is an upper bound on max_f lambda_max(G_f), at most
  (1 + slack)(1 + margin) times it."""

  def __init__(self, make, count: int, chunk: int, *, slack: float = 1e-9,
               power_steps: int = 12, candidates: int = 3, min_dim: int = 64,
               seed: int = 0, cache_bytes: int = 256 << 20):
    self.make, self.count, self.chunk = make, count, chunk
    self.cache_bytes = cache_bytes
    self.slack, self.power_steps, self.candidates = slack, power_steps, candidates
    self.min_dim = min_dim
    self.rng = np.random.default_rng(seed)

  def _chunks(self):
    for start in range(0, self.count, self.chunk):
      yield start, self.make(start, min(start + self.chunk, self.count))

  def value(self) -> float:
    first = self.make(0, 1)[0]
    if min(first.shape) < self.min_dim or self.count <= self.candidates:
      # small matrices: a batched eigvalsh of each is cheaper than power steps
      n = min(first.shape)
      top = max(float(np.max(np.linalg.eigvalsh(_grams(m)))) for _, m in self._chunks())
      return top * (1 + _gram_margin(n))
    # Gram matrices are kept between the passes when they fit in `cache_bytes`
    cache = (self.count * min(first.shape) ** 2 * 16 <= self.cache_bytes)
    kept, rayleigh = [], []
    for _, mats in self._chunks():
      grams = _grams(mats)
      rayleigh.append(_rayleigh(grams, self.power_steps, self.rng))
      kept.append(grams if cache else None)
    rayleigh = np.concatenate(rayleigh)
    lower, n = 0.0, min(first.shape)
    for f in np.argsort(rayleigh)[::-1][:self.candidates]:
      c, r = divmod(int(f), self.chunk)
      gram = kept[c][r] if cache else _grams(self.make(int(f), int(f) + 1))[0]
      lower = max(lower, _lambda_max(gram))
    upper = lower
    for c, (_, mats) in enumerate(self._chunks() if not cache else
                                  ((None, None) for _ in kept)):
      grams = kept[c] if cache else _grams(mats)
      mu = max(lower * (1 + self.slack), np.finfo(np.float64).tiny)
      shifted = -grams
      shifted[:, np.arange(n), np.arange(n)] += mu
      failed = _cholesky_failures(shifted)
      if len(failed) < len(shifted):
        upper = max(upper, mu)
      for i in failed:
        exact = _lambda_max(grams[i])
        lower, upper = max(lower, exact), max(upper, exact)
    return upper * (1 + _gram_margin(n))


def _batched_top_singular(mats: np.ndarray) -> float:
  """max over a batch `[..., a, b]` of spectral norms (certified upper, float64; see
  `_TopEigenvalue`)."""
  a, b = mats.shape[-2:]
  flat = mats.reshape(-1, a, b)
  with _blas_threads():
    top = _TopEigenvalue(lambda i, j: flat[i:j], flat.shape[0], _chunk_len(a, b)).value()
  return math.sqrt(max(top, 0.0))


def _chunk_len(a: int, b: int, budget_bytes: int = 64 << 20) -> int:
  """Matrices per chunk so that a chunk of `[a, b]` complex matrices and its Gram
  matrices stay within `budget_bytes`."""
  n = min(a, b)
  return max(1, budget_bytes // (16 * (a * b + 2 * n * n)))


def _valid_tori(n: int, k: int, s: int, lo: int, n_out: int, count: int) -> list[int]:
  """The `count` smallest torus sizes N on which the polyphase form of one axis of a
  zero-padded strided conv embeds exactly: for every phase r (padded index = q s + r)
  the data positions q are distinct mod N, every read q = o + d (o < n_out, d < k_r)
  outside the data wraps onto no data position, and the n_out outputs are distinct."""
  phases = []
  for r in range(min(s, k)):
    k_r = len(range(r, k, s))
    data = [q for q in range(-1, (lo + n) // s + 2) if lo <= q * s + r < lo + n]
    reads = range(0, n_out + k_r - 1)
    phases.append((set(data), [q for q in reads if q not in set(data)], data))
  found, size = [], max(n_out, 1)
  while len(found) < count:
    ok = True
    for data, outside, data_list in phases:
      wrapped = {q % size for q in data_list}
      if len(wrapped) != len(data_list) or any(q % size in wrapped for q in outside):
        ok = False
        break
    if ok:
      found.append(size)
    size += 1
  return found


def _polyphase_kernel(blocks: np.ndarray, strides: tuple[int, int]) -> np.ndarray:
  """`[g, kh, kw, ci, co]` -> `[g, ceil(kh/s1), ceil(kw/s2), s1 s2 ci, co]` with
  K_poly[d1, d2, (r1, r2, c)] = K[d1 s1 + r1, d2 s2 + r2, c] (0 past the kernel): the
  stride-s conv is the stride-1 conv of K_poly on the s1 x s2 phase images."""
  g, kh, kw, ci, co = blocks.shape
  s1, s2 = strides
  m1, m2 = -(-kh // s1), -(-kw // s2)
  padded = np.zeros((g, m1 * s1, m2 * s2, ci, co), blocks.dtype)
  padded[:, :kh, :kw] = blocks
  poly = padded.reshape(g, m1, s1, m2, s2, ci, co).transpose(0, 1, 3, 2, 4, 5, 6)
  return poly.reshape(g, m1, m2, s1 * s2 * ci, co)


def _half_spectrum(n1: int, n2: int) -> np.ndarray:
  """`[F, 2]` frequencies (w1, w2) of an n1 x n2 torus holding one of each pair
  {w, -w mod N}: for a real kernel the symbol at -w is the conjugate of that at w (same
  singular values), so these cover every frequency."""
  w1, w2 = np.meshgrid(np.arange(n1), np.arange(n2), indexing="ij")
  key, neg = w1 * n2 + w2, ((-w1) % n1) * n2 + (-w2) % n2
  keep = key <= neg
  return np.stack([w1[keep], w2[keep]], axis=1)


def _torus_norm(blocks: np.ndarray, sizes: tuple[int, int]) -> float:
  """max over the torus frequencies of the spectral norm of the kernel symbol
  `sum_{a,b} K[a, b] exp(-2 pi i (w1 a / N1 + w2 b / N2))`, per group (float64; a
  certified upper bound, at most ~1e-9 relative above the exact maximum)."""
  (n1, n2), (g, kh, kw, ci, co) = sizes, blocks.shape
  freqs = _half_spectrum(n1, n2)
  taps = np.stack(np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij"), -1).reshape(-1, 2)
  # phase[f, (a, b)] = exp(-2 pi i (w1 a / N1 + w2 b / N2)); symbols = phase @ kernel taps
  phase = np.exp(-2j * np.pi * (np.outer(freqs[:, 0], taps[:, 0]) / n1 +
                                np.outer(freqs[:, 1], taps[:, 1]) / n2))
  cos, sin = np.ascontiguousarray(phase.real), np.ascontiguousarray(phase.imag)
  kernel = np.moveaxis(blocks.reshape(g, kh * kw, ci * co), 0, 1).reshape(kh * kw, -1)
  step = max(1, _chunk_len(ci, co) // g)     # frequencies per chunk: bounded memory

  def symbols(start, stop):   # [(stop - start) g, ci, co]
    sym = np.empty((stop - start, kernel.shape[1]), np.complex128)
    sym.real, sym.imag = cos[start:stop] @ kernel, sin[start:stop] @ kernel
    return sym.reshape(-1, ci, co)
  with _blas_threads():
    top = _TopEigenvalue(symbols, len(freqs), step).value()
  return math.sqrt(max(top, 0.0))


def circulant_bound(kernel, geom: ConvGeometry, feature_group_count: int = 1,
                    candidates: int = 2) -> tuple[float, tuple[int, int]]:
  """Sound upper bound on ||conv|| from block-circulant embeddings (module docstring):
  the strided conv in polyphase form (a stride-1 conv with s1 s2 Cin channels and a
  ceil(k/s) kernel) is a row selection of a block-circulant on any torus from
  `_valid_tori`; the minimum over the first `candidates` sizes per axis is returned
  with its torus. Circular padding: the stride-1 circulant on the H x W torus itself."""
  blocks = _group_blocks(np.asarray(kernel, np.float64), feature_group_count)
  if geom.circular:
    if any(no * s > n for n, no, s in zip(geom.in_hw, geom.out_hw, geom.strides)):
      raise ValueError(f"circular conv with strides {geom.strides} on {geom.in_hw}: "
                       "outputs wrap")
    return _torus_norm(blocks, geom.in_hw) * (1 + F64_MARGIN), tuple(geom.in_hw)
  poly = _polyphase_kernel(blocks, geom.strides)
  tori = [_valid_tori(n, k, s, lo, no, candidates) for n, k, s, (lo, _), no in
          zip(geom.in_hw, geom.kernel_hw, geom.strides, geom.pads, geom.out_hw)]
  if tori[0][0] * tori[1][0] * poly[0].size > 1e6:   # big layer: the smallest torus only
    tori = [t[:1] for t in tori]
  results = [(_torus_norm(poly, (a, b)), (a, b)) for a in tori[0] for b in tori[1]]
  value, torus = min(results)
  return value * (1 + F64_MARGIN), torus


def patch_bound(kernel, geom: ConvGeometry, feature_group_count: int = 1) -> float:
  """Sound upper bound sqrt(c) * max_g ||K_g||_2 (module docstring)."""
  blocks = _group_blocks(np.asarray(kernel, np.float64), feature_group_count)
  g, kh, kw, ci, co = blocks.shape
  mats = blocks.reshape(g, kh * kw * ci, co)
  return math.sqrt(window_overlap(geom)) * _batched_top_singular(mats) * (1 + F64_MARGIN)


@functools.partial(jax.jit, static_argnames=("geom", "groups", "num_iters", "tol"))
def _conv_lanczos(kernel, x0, *, geom, groups, num_iters, tol):
  """Top eigenvalue of A^T A (A the conv) by Lanczos through the conv and its transpose,
  from the start vector x0 `[H, W, Cin]` (drawn by NumPy: no RNG to compile)."""
  lin = functools.partial(conv_apply, kernel, geom=geom, feature_group_count=groups)
  lin_t = jax.linear_transpose(lin, x0)

  def gram(v):
    return lin_t(lin(v.reshape(x0.shape)))[0].reshape(-1)
  return lanczos(gram, x0.reshape(-1), k=1, num_iters=num_iters, tol=tol)


DEFAULT_MAX_MATRIX_BYTES = 1 << 30
_CHUNK_BYTES = 64 << 20


@functools.partial(jax.jit, static_argnames=("geom", "groups", "rows"))
def _conv_basis_images(kernel, basis, *, geom, groups, rows):
  """Images of a chunk of unit vectors `[k, in]` under the conv (`rows=False`: the
  columns of its matrix) or of `[k, out]` under its transpose (`rows=True`: rows)."""
  cin = kernel.shape[2] * groups
  x0 = jnp.zeros((*geom.in_hw, cin), kernel.dtype)

  def lin(x):
    return conv_apply(kernel, x.reshape(x0.shape), geom, groups).reshape(-1)
  if rows:
    lin_t = jax.linear_transpose(lin, x0.reshape(-1))
    return jax.vmap(lambda e: lin_t(e)[0])(basis)
  return jax.vmap(lin)(basis)


def conv_matrix(kernel, geom: ConvGeometry, feature_group_count: int = 1, *,
                max_bytes: int = DEFAULT_MAX_MATRIX_BYTES) -> np.ndarray:
  """The explicit `[out_size, in_size]` float64 matrix of the conv (exact: each entry is
  one kernel weight or 0), built from the images of unit vectors of the smaller side
  (columns through the conv, or rows through its transpose) in chunks of bounded
  memory, so no `in x in` identity is ever formed. For tests and small layers: raises
  ValueError when the matrix itself would exceed `max_bytes`."""
  kernel = jnp.asarray(kernel)
  cin = kernel.shape[2] * feature_group_count
  n_in = geom.in_hw[0] * geom.in_hw[1] * cin
  n_out = geom.out_hw[0] * geom.out_hw[1] * kernel.shape[3]
  if n_in * n_out * 8 > max_bytes:
    raise ValueError(f"conv_matrix: the explicit [{n_out}, {n_in}] float64 matrix needs "
                     f"{n_in * n_out * 8 / 2**30:.2f} GiB > max_bytes={max_bytes} bytes; "
                     "use conv_operator_norm's matrix-free bounds instead")
  rows = n_out <= n_in
  small, big = (n_out, n_in) if rows else (n_in, n_out)
  chunk = max(1, min(small, _CHUNK_BYTES // (4 * (big + small))))
  out = np.empty((small, big), np.float64)
  for start in range(0, small, chunk):
    idx = np.arange(start, start + chunk)   # fixed chunk size: one compile
    basis = jnp.asarray(idx[:, None] == np.arange(small)[None, :], kernel.dtype)
    imgs = _conv_basis_images(kernel, basis, geom=geom, groups=feature_group_count,
                              rows=rows)
    stop = min(start + chunk, small)
    out[start:stop] = np.asarray(imgs, np.float64)[:stop - start]
  return out if rows else out.T


def _explicit_norm(mat: np.ndarray) -> float:
  gram = mat @ mat.T if mat.shape[0] <= mat.shape[1] else mat.T @ mat
  return math.sqrt(max(float(np.linalg.eigvalsh(gram)[-1]), 0.0))


def conv_operator_norm(kernel, input_shape: Sequence[int], *, strides=(1, 1),
                       padding="SAME", feature_group_count: int = 1, path: Path = (),
                       kind: str = "conv", estimate: bool = True, tol: float = 1e-6,
                       num_iters: int = 100, exact_max_dim: int = DEFAULT_EXACT_MAX_DIM,
                       seed: int = 0, start=None) -> OperatorNorm:
  """Spectral norm of the 2-D conv with `kernel` `[kh, kw, Cin/g, Cout]` on inputs of
  `input_shape` `[H, W, Cin]` (module docstring). `estimate=False` skips the Lanczos
  iteration of large layers (then `estimate` is NaN and only `upper` is meaningful).
  `start`: Lanczos start vector `[H, W, Cin]` (e.g. a previous result's `vector`);
  default a random one from `seed`."""
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 4:
    raise ValueError(f"conv kernel of shape {kernel.shape}: only 2-D convs [kh, kw, in, out]")
  h, w, cin = map(int, input_shape)
  g = int(feature_group_count)
  if g < 1 or cin % g or kernel.shape[3] % g or kernel.shape[2] * g != cin:
    raise ValueError(f"conv kernel {tuple(kernel.shape)} with feature_group_count={g} does "
                     f"not fit input channels {cin}")
  geom = ConvGeometry.make((h, w), kernel.shape[:2], strides, padding)
  in_dim = h * w * cin
  out_dim = geom.out_hw[0] * geom.out_hw[1] * kernel.shape[3]
  patch = patch_bound(kernel, geom, g)
  bounds = {"patch (im2col)": patch}
  if geom.kernel_hw != (1, 1) or window_overlap(geom) > 1:
    # (a 1x1 conv reading each pixel at most once is a pixel selection (x) K: its norm
    # is max_g ||K_g|| = the patch bound, so the circulant bound cannot be tighter)
    circ, torus = circulant_bound(kernel, geom, g)
    bounds[f"circulant on a {torus[0]}x{torus[1]} torus"] = circ
  iters, rel, converged, vector = 0, 0.0, True, None
  if min(in_dim, out_dim) <= exact_max_dim and \
      in_dim * out_dim * 8 <= DEFAULT_MAX_MATRIX_BYTES:
    value = _explicit_norm(conv_matrix(kernel, geom, g))
    bounds["explicit float64 matrix"] = value * (1 + F64_MARGIN)
    exact, method = True, "explicit"
  elif estimate:
    if start is not None and np.shape(start) != (h, w, cin):
      raise ValueError(f"Lanczos start vector of shape {np.shape(start)}; expected the "
                       f"layer's input shape {(h, w, cin)}")
    x0 = np.random.default_rng(seed).standard_normal((h, w, cin)) if start is None else \
        np.asarray(start)
    eig = _conv_lanczos(kernel, jnp.asarray(x0, kernel.dtype), geom=geom, groups=g,
                        num_iters=num_iters, tol=tol)
    value = math.sqrt(max(float(eig.eigenvalues[0]), 0.0))
    iters, rel = int(eig.iterations), float(eig.rel_change)
    converged = bool(eig.converged)
    vector = np.asarray(eig.eigenvectors[0]).reshape(h, w, cin)
    exact, method = False, "lanczos"
  else:
    value, exact, method = float("nan"), False, "none"
  best = min(bounds, key=bounds.get)
  return OperatorNorm(path, kind, value, bounds[best], exact, method, iters, rel,
                      (h, w, cin), notes=f"upper = {best} bound; " + ", ".join(
                          f"{k}: {v:.6g}" for k, v in bounds.items()),
                      converged=converged, vector=vector)


# ---------------------------------------------------------------------------- pools

def pool_operator_norm(pool: st.Pool, input_shape: Sequence[int], **conv_kwargs
                       ) -> OperatorNorm:
  """Lipschitz constant of a pooling node on inputs `[H, W, C]` (module docstring)."""
  h, w, _ = map(int, input_shape)
  shape = (h, w, int(input_shape[-1]))
  if pool.kind == "global_avg":
    value = 1.0 / math.sqrt(h * w)
    return OperatorNorm((), "pool:global_avg", value, value * (1 + F64_MARGIN), True,
                        "closed_form", input_shape=shape, notes="1/sqrt(positions)")
  window = tuple(pool.window)
  strides = tuple(pool.strides) or window
  if pool.kind == "avg":
    kernel = jnp.full((*window, 1, 1), 1.0 / math.prod(window), jnp.float32)
    res = conv_operator_norm(kernel, (h, w, 1), strides=strides, padding=pool.padding,
                             kind="pool:avg", **conv_kwargs)
    return dataclasses.replace(res, input_shape=shape, notes=res.notes +
                               " (depthwise constant kernel; count_include_pad)")
  if pool.kind == "max":
    geom = ConvGeometry.make((h, w), window, strides, pool.padding)
    value = math.sqrt(window_overlap(geom))
    return OperatorNorm((), "pool:max", value, value, True, "closed_form", input_shape=shape,
                        notes="sqrt(max windows covering a pixel)")
  raise ValueError(f"pool kind {pool.kind!r}; supported: 'avg', 'global_avg', 'max'")


# ------------------------------------------------------------------- per-model listing

def linear_operator_norm(node: st.Linear, params: Mapping, call: model_info.ModuleCall,
                         **conv_kwargs) -> OperatorNorm:
  """Operator norm of one Linear node given its module call (input shape);
  `conv_kwargs` go to `conv_operator_norm` (dense kernels need none)."""
  layer = model_info.get_at(params, node.path)
  if layer is None or "kernel" not in layer:
    raise ValueError(f"no params['{'/'.join(node.path)}']['kernel'] for Linear node {node}")
  kernel = layer["kernel"]
  in_shape = tuple(call.in_shape[1:])
  if node.kind == "dense":
    if in_shape[-1] != kernel.shape[0]:
      raise ValueError(f"dense {'/'.join(node.path)}: input features {in_shape[-1]} != "
                       f"kernel rows {kernel.shape[0]}")
    return dense_operator_norm(kernel, node.path, in_shape)
  if node.kind == "conv":
    if len(in_shape) != 3:
      raise ValueError(f"conv {'/'.join(node.path)}: input shape {in_shape} is not [H, W, C]")
    res = conv_operator_norm(kernel, in_shape, strides=node.strides, padding=node.padding,
                             feature_group_count=node.feature_group_count, path=node.path,
                             **conv_kwargs)
    geom = ConvGeometry.make(in_shape[:2], kernel.shape[:2], node.strides, node.padding)
    size = geom.out_hw[0] * geom.out_hw[1] * kernel.shape[3]
    if size != call.out_size:
      raise ValueError(f"conv {'/'.join(node.path)}: structure() metadata (strides "
                       f"{node.strides}, padding {node.padding!r}) gives {size} outputs but "
                       f"the module produced {call.out_size}")
    return res
  raise ValueError(f"Linear node kind {node.kind!r}; supported: 'dense', 'conv'")


def layer_operator_norms(model, variables: Mapping, *, input_shape: Sequence[int],
                         estimate: bool = True, tol: float = 1e-6, num_iters: int = 100,
                         exact_max_dim: int = DEFAULT_EXACT_MAX_DIM, seed: int = 0,
                         workers: int = 2,
                         start_vectors: Optional[Mapping[Path, np.ndarray]] = None
                         ) -> dict[Path, OperatorNorm]:
  """`OperatorNorm` of every Linear node of `model.structure()`, keyed by its path, at
  the input size each layer sees for one example of shape `input_shape` (no batch axis;
  found by tracing the model under `jax.eval_shape`). `workers` threads compute layers
  in parallel. `estimate=False` skips the Lanczos estimate of large convs: use it where
  only the certified `upper` is needed (ResNet-18 width 64 at 32x32 then takes seconds
  instead of minutes). `start_vectors`: `{path: vector}` of a previous call (e.g.
  `{p: r.vector for p, r in previous.items() if r.vector is not None}`) to warm-start
  each conv's Lanczos there (a wrong shape is a ValueError)."""
  node = model_info.structure_of(model)
  if node is None:
    raise ValueError(f"{type(model).__name__} has no structure(); see lipnorm.models.structure")
  calls = model_info.module_calls(model, variables, input_shape)
  layers = st.linear_layers(node)
  for lin in layers:
    if lin.path not in calls:
      raise ValueError(f"Linear node path {lin.path} was never called on input_shape "
                       f"{tuple(input_shape)}; module paths seen: {sorted(calls)[:20]}")

  starts = dict(start_vectors or {})

  def one(lin):
    kw = {"start": starts[lin.path]} if lin.kind == "conv" and lin.path in starts else {}
    return linear_operator_norm(lin, variables["params"], calls[lin.path],
                                estimate=estimate, tol=tol, num_iters=num_iters,
                                exact_max_dim=exact_max_dim, seed=seed, **kw)
  if workers < 1:
    raise ValueError(f"workers={workers}; allowed: an int >= 1")
  # NumPy's float64 linear algebra releases the GIL: layers run in parallel threads,
  # each on single-threaded BLAS.
  with _blas_threads(), ThreadPoolExecutor(max_workers=workers) as pool:
    results = list(pool.map(one, layers))
  return {lin.path: res for lin, res in zip(layers, results)}
