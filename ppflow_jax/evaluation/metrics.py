"""Sample-quality metrics of the ADM evaluation suite, in NumPy: FID / sFID, Inception Score and
improved precision/recall, plus readers for ADM reference and sample batches (`.npz`).

Everything that feeds a reported number is float64 except the pairwise distances of
precision/recall: float16 with a float32 fallback per block by default, as ADM's evaluator
(`distances='float32'` or `'float64'` on request). The
metric functions know nothing about the network that produced the features: the Inception
features (`inception.py`) and the Fashion-MNIST classifier features (`fmnist_features.py`) go
through the same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zipfile
from typing import Iterator

import numpy as np

from ppflow_jax import paths


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance (unbiased, as `np.cov` in ADM) of `features: (N, D)` -> (D,), (D, D)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f'feature_stats needs features of shape (N >= 2, D), got {features.shape}')
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _clip_eigenvalues(w: np.ndarray) -> np.ndarray:
  """Zeroes eigenvalues of a PSD matrix that are negative or below its rounding noise."""
  tol = max(w.max(initial=0.0), 0.0) * len(w) * np.finfo(np.float64).eps
  return np.where(w > tol, w, 0.0)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
  """Symmetric square root of a (numerically) PSD matrix (D, D)."""
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(_clip_eigenvalues(w))) @ v.T


def fid(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); mu: (D,), sigma: (D, D).

  tr sqrt(sigma1 sigma2) is computed as tr sqrt(S sigma2 S) with S = sqrt(sigma1): the two
  matrices share their eigenvalues, and the second is symmetric PSD, so `eigvalsh` applies and
  the result is real and finite even for rank-deficient covariances (fewer samples than
  dimensions), where `scipy.linalg.sqrtm(sigma1 @ sigma2)` may return complex values or NaN.
  Eigenvalues below the rounding noise (D * eps * largest) count as 0: the square root would
  otherwise amplify 1e-16 noise in each null direction to 1e-8.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f'fid: inconsistent shapes mu1 {mu1.shape}, sigma1 {sigma1.shape}, '
                     f'mu2 {mu2.shape}, sigma2 {sigma2.shape}; expected (D,) and (D, D) for '
                     'both (were both statistics computed with the same feature layer?)')
  for name, x in (('mu1', mu1), ('sigma1', sigma1), ('mu2', mu2), ('sigma2', sigma2)):
    if not np.all(np.isfinite(x)):
      raise ValueError(f'fid: {name} contains NaN or inf (check the features it came from)')
  s1 = _sqrt_psd(sigma1)
  m = s1 @ sigma2 @ s1
  eig = np.linalg.eigvalsh((m + m.T) / 2)
  tr_covmean = np.sqrt(_clip_eigenvalues(eig)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_bootstrap_std(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray,
                      draws: int = 20, seed: int = 0) -> float:
  """How much the FID of `features: (N, D)` against N(mu_ref, sigma_ref) moves with the sample:
  the standard deviation of the FID over `draws` resamples (with replacement) of the N rows.
  It measures the noise of one FID check from the samples already drawn, so a change smaller
  than a few of these is not evidence that the model changed."""
  features = np.asarray(features, np.float64)
  rng = np.random.default_rng(seed)
  fids = [fid(*feature_stats(features[rng.integers(0, len(features), len(features))]),
              mu_ref, sigma_ref) for _ in range(draws)]
  return float(np.std(fids, ddof=1))


ADM_IS_SPLIT_SIZE = 5000  # ADM's evaluator: IS over contiguous chunks of 5,000 samples.
PR_DISTANCES = ('float16', 'float32', 'float64')


def inception_score(scores: np.ndarray, split_size: int | None = ADM_IS_SPLIT_SIZE, *,
                    from_logits: bool = True, splits: int | None = None) -> float:
  """Inception Score: mean over splits of exp(mean_x KL(p(y|x) || p(y))), p(y) per split.

  Args:
    scores: (N, K) logits (`from_logits=True`, softmax applied here in float64) or
      probabilities (`from_logits=False`; rows must sum to 1).
    split_size: ADM's rule (default): contiguous chunks of this many samples, the last one
      possibly shorter (at N = 50,000: 10 splits; at 12,000: 5,000 / 5,000 / 2,000).
    splits: instead, this many contiguous near-equal splits (`np.array_split`, torch-fidelity's
      and pytorch-gan-metrics' rule); it differs from ADM's unless N = splits * 5,000.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2:
    raise ValueError(f'inception_score expects (N, K) logits or probabilities, got {scores.shape}')
  if from_logits:
    logp = scores - scores.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
  else:
    if np.any(scores < 0) or not np.allclose(scores.sum(axis=1), 1, atol=1e-4):
      raise ValueError('inception_score(from_logits=False) needs rows of probabilities summing '
                       'to 1; pass logits with from_logits=True instead')
    with np.errstate(divide='ignore'):
      logp = np.log(scores)
  p = np.exp(logp)
  if splits is not None:
    if not 1 <= splits <= len(p):
      raise ValueError(f'inception_score: splits={splits} must be in [1, N={len(p)}]')
    edges = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(len(p)), splits)])
    parts = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]
  else:
    if split_size is None or split_size < 1:
      raise ValueError(f'inception_score: split_size={split_size} must be >= 1 (or give splits)')
    parts = [slice(b, b + split_size) for b in range(0, len(p), split_size)]
  split_scores = []
  for part in parts:
    pp, lp = p[part], logp[part]
    log_py = np.log(pp.mean(axis=0))
    # p log p is 0 where p == 0 (ADM's formula gives NaN there).
    kl = (pp * np.where(pp > 0, lp - log_py, 0.0)).sum(axis=1).mean()
    split_scores.append(np.exp(kl))
  return float(np.mean(split_scores))


def _sq_dists_float16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """ADM's float16 distance block: inputs, squared norms, the product and every sum rounded to
  float16 (reductions and the matrix product accumulate in float32, as on a GPU)."""
  f32 = lambda x: x.astype(np.float32)
  with np.errstate(over='ignore', invalid='ignore'):  # overflow -> inf -> the float32 fallback
    a16, b16 = a.astype(np.float16), b.astype(np.float16)
    norm_a = np.square(a16).astype(np.float32).sum(1).astype(np.float16)
    norm_b = np.square(b16).astype(np.float32).sum(1).astype(np.float16)
    prod = (f32(a16) @ f32(b16).T).astype(np.float16)
    d = norm_a[:, None] - np.float16(2) * prod + norm_b[None, :]
  return np.maximum(d, np.float16(0))


def _sq_dists(a: np.ndarray, b: np.ndarray, distances: str = 'float32') -> np.ndarray:
  """Squared Euclidean distances (A, B) between rows of `a: (A, D)` and `b: (B, D)`.

  'float16': ADM's block (`_sq_dists_float16`), redone in float32 when any entry overflows
  (ADM's fallback, also decided per block); the result is float32 then.
  """
  if distances == 'float16':
    d = _sq_dists_float16(a, b)
    if np.all(np.isfinite(d)):
      return d.astype(np.float32)
    distances = 'float32'
  a, b = np.asarray(a, distances), np.asarray(b, distances)
  if np.shares_memory(a, b):  # BLAS would take its symmetric (syrk) path for a block against
    b = b.copy()              # itself: keep the arithmetic of every block the same.
  d = (a * a).sum(1)[:, None] - 2 * (a @ b.T) + (b * b).sum(1)[None, :]
  return np.maximum(d, 0)


def _check_distances(distances: str) -> None:
  if distances not in PR_DISTANCES:
    raise ValueError(f'precision/recall distances={distances!r} must be one of {PR_DISTANCES} '
                     "('float16' = ADM's evaluator)")


def manifold_radii(features: np.ndarray, k: int = 3, batch_size: int = 1000,
                   distances: str = 'float16') -> np.ndarray:
  """Squared distance from each row of `features: (N, D)` to its k-th nearest other row -> (N,).

  As ADM's `ManifoldEstimator`: the k-th smallest distance counting the point itself at index 0
  (so a duplicate point counts as a neighbour). Rows are processed `batch_size` at a time, so
  memory is O(batch_size * N); `distances` as `precision_recall`.
  """
  _check_distances(distances)
  f = np.asarray(features, np.float64 if distances == 'float64' else np.float32)
  if f.ndim != 2 or len(f) <= k:
    raise ValueError(f'manifold_radii needs (N > k={k}, D) features, got {f.shape}')
  radii = np.empty(len(f), np.float64 if distances == 'float64' else np.float32)
  for s in range(0, len(f), batch_size):
    d = np.concatenate([_sq_dists(f[s:s + batch_size], f[t:t + batch_size], distances)
                        for t in range(0, len(f), batch_size)], axis=1)
    radii[s:s + batch_size] = np.partition(d, k, axis=1)[:, k]
  return radii


def _coverage(points: np.ndarray, centers: np.ndarray, radii: np.ndarray,
              batch_size: int, distances: str) -> float:
  """Fraction of `points: (P, D)` inside at least one ball (centers: (C, D), squared radii: (C,))."""
  inside = np.zeros(len(points), bool)
  for s in range(0, len(points), batch_size):
    for t in range(0, len(centers), batch_size):
      d = _sq_dists(points[s:s + batch_size], centers[t:t + batch_size], distances)
      inside[s:s + batch_size] |= (d <= radii[None, t:t + batch_size]).any(axis=1)
  return float(inside.mean())


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, k: int = 3,
                     batch_size: int = 1000, distances: str = 'float16',
                     ref_radii: np.ndarray | None = None) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019), as ADM's evaluator.

  precision: fraction of samples inside the reference manifold (union of balls around each
  reference point with radius = distance to its k-th nearest reference neighbour); recall: the
  fraction of reference points inside the sample manifold. ref: (N, D), sample: (M, D).
  Distances are computed in blocks of `batch_size` rows, in `distances` precision: 'float16'
  (ADM's default, with its float32 fallback for a block that overflows), 'float32' (ADM's
  fallback everywhere) or 'float64'. `ref_radii`: `manifold_radii(ref_features, k, ...)` with
  the same `distances`, if already computed.
  """
  _check_distances(distances)
  dtype = np.float64 if distances == 'float64' else np.float32
  ref = np.asarray(ref_features, dtype)
  sample = np.asarray(sample_features, dtype)
  if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
    raise ValueError(f'precision_recall needs (N, D) and (M, D) features, got {ref.shape} and '
                     f'{sample.shape}')
  if ref_radii is None:
    ref_radii = manifold_radii(ref, k, batch_size, distances)
  elif ref_radii.shape != (len(ref),):
    raise ValueError(f'ref_radii has shape {ref_radii.shape}, expected ({len(ref)},)')
  sample_radii = manifold_radii(sample, k, batch_size, distances)
  precision = _coverage(sample, ref, ref_radii, batch_size, distances)
  recall = _coverage(ref, sample, sample_radii, batch_size, distances)
  return precision, recall


# ----------------------------------------------------------------------------- ADM .npz files


@dataclasses.dataclass
class ReferenceBatch:
  """Statistics of an ADM reference batch: pool_3 (mu, sigma) and spatial (mu_s, sigma_s)."""
  path: str
  mu: np.ndarray        # (2048,)
  sigma: np.ndarray     # (2048, 2048)
  mu_s: np.ndarray      # (2023,)
  sigma_s: np.ndarray   # (2023, 2023)
  num_images: int       # images in `arr_0` (0 if the file has none); read with `iter_images`.

  def iter_images(self, batch_size: int) -> Iterator[np.ndarray]:
    """Yields the reference images (b, H, W, 3) uint8, streamed from the file."""
    return iter_images(self.path, batch_size)


def load_reference_batch(path: str) -> ReferenceBatch:
  """Reads an ADM reference batch (`VIRTUAL_imagenet256_labeled.npz` layout).

  Keys: `mu`, `sigma` (pool_3), `mu_s`, `sigma_s` (spatial), `arr_0` (uint8 NHWC images, used
  for precision/recall). The statistics are loaded; the images are streamed on demand.
  """
  with paths.as_path(path).open('rb') as fh, np.load(fh) as f:
    missing = [k for k in ('mu', 'sigma', 'mu_s', 'sigma_s') if k not in f.files]
    if missing:
      raise ValueError(f'{path} is not an ADM reference batch: missing keys {missing} (has '
                       f'{f.files}); expected mu, sigma, mu_s, sigma_s and arr_0 as in '
                       'VIRTUAL_imagenet256_labeled.npz')
    stats = {k: f[k].astype(np.float64) for k in ('mu', 'sigma', 'mu_s', 'sigma_s')}
    has_images = 'arr_0' in f.files
  num_images = _npz_array_shape(path, 'arr_0')[0] if has_images else 0
  return ReferenceBatch(path=path, num_images=num_images, **stats)


def _check_images(images: np.ndarray, path: str) -> None:
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'{path}: arr_0 must be uint8 (N, H, W, 3) images, got {images.dtype} '
                     f'{images.shape}')


def _read_npy_header(fp) -> tuple[tuple[int, ...], bool, np.dtype]:
  version = np.lib.format.read_magic(fp)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(fp)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(fp)
  raise ValueError(f'unsupported .npy format version {version}')


@contextlib.contextmanager
def _open_npz(path: str) -> Iterator[zipfile.ZipFile]:
  """An .npz (a zip) at a local path or a URL, read in place (ranged reads on object stores)."""
  with paths.as_path(path).open('rb') as f, zipfile.ZipFile(f) as z:
    yield z


def _npz_array_shape(path: str, key: str) -> tuple[int, ...]:
  with _open_npz(path) as z, z.open(f'{key}.npy') as fp:
    return _read_npy_header(fp)[0]


def iter_npz_array(path: str, key: str, batch_size: int) -> Iterator[np.ndarray]:
  """Streams `key` of an `.npz` in batches along axis 0 without loading it whole.

  A 50k x 256 x 256 x 3 sample batch is 9.8 GB; this reads `batch_size` rows at a time.
  """
  with _open_npz(path) as z:
    if f'{key}.npy' not in z.namelist():
      raise ValueError(f'{path} has no array {key!r} (has {z.namelist()})')
    with z.open(f'{key}.npy') as fp:
      shape, fortran, dtype = _read_npy_header(fp)
      if fortran or dtype.hasobject:
        raise ValueError(f'{path}:{key} is Fortran-ordered or an object array; save it with '
                         'np.savez from a C-contiguous numeric array')
      row = int(np.prod(shape[1:])) * dtype.itemsize
      for start in range(0, shape[0], batch_size):
        n = min(batch_size, shape[0] - start)
        buf = fp.read(n * row)
        if len(buf) != n * row:
          raise ValueError(f'{path}:{key} is truncated (expected {shape[0]} rows)')
        yield np.frombuffer(buf, dtype).reshape((n, *shape[1:]))


def iter_images(path: str, batch_size: int) -> Iterator[np.ndarray]:
  """Streams the uint8 (b, H, W, 3) images `arr_0` of an ADM sample or reference batch."""
  for batch in iter_npz_array(path, 'arr_0', batch_size):
    _check_images(batch, path)
    yield batch
