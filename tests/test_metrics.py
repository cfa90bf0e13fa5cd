"""Metric code against independent references: scipy sqrtm FID, and plain-loop IS and
precision/recall; plus the ADM .npz readers."""

from __future__ import annotations

import numpy as np
import pytest

from ppflow_jax.evaluation import metrics

scipy_linalg = pytest.importorskip('scipy.linalg')


def _random_cov(rng, d, n):
  x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
  return np.cov(x, rowvar=False)


def _scipy_fid(mu1, s1, mu2, s2):
  covmean = scipy_linalg.sqrtm(s1 @ s2)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize('d', [2, 16, 64])
def test_fid_matches_scipy_sqrtm(d):
  rng = np.random.default_rng(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_cov(rng, d, 4 * d), _random_cov(rng, d, 4 * d)
  ours = metrics.fid(mu1, s1, mu2, s2)
  assert ours == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-6)
  assert ours == pytest.approx(metrics.fid(mu2, s2, mu1, s1), rel=1e-8)  # Symmetric.


def test_fid_closed_form_on_diagonal_covariances():
  # Commuting covariances: FID = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2, zeros included.
  a = np.array([4.0, 1.0, 0.0, 9.0])
  b = np.array([1.0, 0.0, 0.0, 16.0])
  mu1, mu2 = np.array([1.0, 0, 0, 0]), np.zeros(4)
  expected = 1.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert metrics.fid(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fid_real_and_finite_for_rank_deficient_covariances():
  rng = np.random.default_rng(0)
  d = 128
  f1, f2 = rng.normal(size=(20, d)), rng.normal(size=(30, d)) + 0.5  # Rank 19 and 29.
  mu1, s1 = metrics.feature_stats(f1)
  mu2, s2 = metrics.feature_stats(f2)
  value = metrics.fid(mu1, s1, mu2, s2)
  assert isinstance(value, float) and np.isfinite(value) and value > 0
  # Same statistics: exactly zero up to rounding, where sqrtm of a singular product is unreliable.
  assert abs(metrics.fid(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)
  # A rank-deficient matrix within rounding of the full-rank reference value.
  s_full = s2 + 1e-3 * np.eye(d)
  assert metrics.fid(mu1, s1, mu2, s_full) == pytest.approx(
      _scipy_fid(mu1, s1 + 1e-10 * np.eye(d), mu2, s_full), rel=1e-4)


def test_fid_bootstrap_std_matches_the_spread_over_fresh_samples():
  # Features from N(0.3, I) against the reference N(0, I): the bootstrap spread of one sample's
  # FID estimates how much the FID of a fresh sample of the same size moves.
  rng = np.random.default_rng(0)
  d, n = 8, 400
  mu_ref, sigma_ref = np.zeros(d), np.eye(d)
  fresh = [metrics.fid(*metrics.feature_stats(rng.normal(0.3, 1.0, (n, d))), mu_ref, sigma_ref)
           for _ in range(60)]
  boot = metrics.fid_bootstrap_std(rng.normal(0.3, 1.0, (n, d)), mu_ref, sigma_ref, draws=60)
  assert 0.6 < boot / np.std(fresh, ddof=1) < 1.6
  # Four times the samples: about half the noise.
  boot4 = metrics.fid_bootstrap_std(rng.normal(0.3, 1.0, (4 * n, d)), mu_ref, sigma_ref, draws=60)
  assert 0.3 < boot4 / boot < 0.8


def test_fid_rejects_bad_shapes_and_nans():
  with pytest.raises(ValueError, match='inconsistent shapes'):
    metrics.fid(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match='NaN'):
    metrics.fid(np.zeros(2), np.eye(2), np.array([np.nan, 0]), np.eye(2))


def test_feature_stats():
  x = np.random.default_rng(0).normal(size=(50, 5)).astype(np.float32)
  mu, sigma = metrics.feature_stats(x)
  assert mu.dtype == np.float64 and sigma.shape == (5, 5)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
  with pytest.raises(ValueError):
    metrics.feature_stats(np.zeros((1, 5)))


def _naive_is(probs, split_size):
  scores = []
  for s in range(0, len(probs), split_size):
    part = probs[s:s + split_size]
    py = part.mean(axis=0)
    kls = [sum(p[c] * np.log(p[c] / py[c]) for c in range(len(p)) if p[c] > 0) for p in part]
    scores.append(np.exp(np.mean(kls)))
  return float(np.mean(scores))


def test_inception_score_matches_naive():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=3, size=(200, 12))
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  expected = _naive_is(probs, 20)
  assert metrics.inception_score(logits, splits=10) == pytest.approx(expected, rel=1e-10)
  assert metrics.inception_score(probs, splits=10, from_logits=False) == pytest.approx(
      expected, rel=1e-10)
  assert metrics.inception_score(logits, split_size=20) == pytest.approx(expected, rel=1e-10)
  # ADM's chunks of split_size with a short last chunk.
  assert metrics.inception_score(logits, split_size=60) == pytest.approx(
      _naive_is(probs, 60), rel=1e-10)


def test_inception_score_default_is_adm_splitting():
  """ADM: contiguous chunks of 5,000 (at 12,000 samples: 5,000 / 5,000 / 2,000), not 10 splits."""
  rng = np.random.default_rng(5)
  logits = rng.normal(scale=4, size=(12_000, 10)) + 3 * np.eye(10)[rng.integers(0, 10, 12_000)]
  logits[:5000] *= 0.3  # chunks of different sharpness: the split rule changes the score
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)

  def chunk_is(p):
    py = p.mean(0)
    return np.exp(np.mean(np.sum(p * np.log(p / py), axis=1)))
  adm = np.mean([chunk_is(probs[a:a + 5000]) for a in range(0, 12_000, 5000)])
  assert metrics.inception_score(logits) == pytest.approx(adm, rel=1e-10)
  assert metrics.inception_score(logits, split_size=5000) == pytest.approx(adm, rel=1e-10)
  ten = metrics.inception_score(logits, splits=10)
  assert abs(ten - adm) > 1e-3 * adm  # the other common rule gives another number


def test_inception_score_limits():
  # Identical predictions: IS = 1; confident predictions spread over K classes: IS = K.
  assert metrics.inception_score(np.zeros((40, 7)), splits=4) == pytest.approx(1.0)
  onehot = np.eye(8)[np.arange(80) % 8]
  assert metrics.inception_score(onehot, splits=2, from_logits=False) == pytest.approx(8.0)
  with pytest.raises(ValueError, match='summing'):
    metrics.inception_score(np.ones((4, 3)), splits=1, from_logits=False)


def _naive_precision_recall(ref, sample, k):
  def radii(x):
    return np.array([np.sort(np.linalg.norm(x - p, axis=1))[k] for p in x])

  def covered(points, centers, r):
    return np.mean([any(np.linalg.norm(p - c) <= rc for c, rc in zip(centers, r))
                    for p in points])

  return covered(sample, ref, radii(ref)), covered(ref, sample, radii(sample))


@pytest.mark.parametrize('distances', ['float64', 'float32'])
def test_precision_recall_matches_naive(distances):
  rng = np.random.default_rng(1)
  ref = rng.normal(size=(120, 6))
  sample = rng.normal(size=(90, 6)) * 1.3 + 0.4
  expected = _naive_precision_recall(ref, sample, 3)
  ours = metrics.precision_recall(ref, sample, k=3, batch_size=17, distances=distances)
  assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95  # A non-trivial case.
  assert ours == pytest.approx(expected, abs=1e-12)
  radii = metrics.manifold_radii(ref, k=3, distances=distances)
  assert metrics.precision_recall(ref, sample, ref_radii=radii, distances=distances) == ours


def _adm_float16_distance(u, v):
  """One pair, as ADM's TF block in float16: |u|^2 - 2 u.v + |v|^2, each result rounded to
  float16 (sums and the product accumulated in float32), then clipped at 0."""
  h = lambda x: np.float16(x)
  u16, v16 = u.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
  nu = h(np.sum(np.float32(h(u16 ** 2))))
  nv = h(np.sum(np.float32(h(v16 ** 2))))
  uv = h(np.dot(u16, v16))
  return max(float(h(h(nu - h(2 * uv)) + nv)), 0.0)


def _naive_adm_float16_pr(ref, sample, k):
  def radii(x):
    return [sorted(_adm_float16_distance(p, q) for q in x)[k] for p in x]

  def covered(points, centers, r):
    return np.mean([any(_adm_float16_distance(p, c) <= rc for c, rc in zip(centers, r))
                    for p in points])

  return covered(sample, ref, radii(ref)), covered(ref, sample, radii(sample))


def _inception_like(rng, n, d=48, scale=2.0):
  """Non-negative (post-ReLU) activations with |x|^2 in the hundreds, as pool_3 features."""
  return np.maximum(rng.normal(loc=1.0, scale=scale, size=(n, d)), 0).astype(np.float32)


def test_precision_recall_float16_is_adm_default():
  """float16 distances (the default) equal a per-pair ADM float16 reference exactly, and differ
  from float32 ones: squared norms ~250 are rounded to multiples of 0.125 in float16."""
  rng = np.random.default_rng(3)
  ref = _inception_like(rng, 70)
  sample = _inception_like(rng, 50) * 1.05 + 0.02
  assert metrics.precision_recall(ref, sample) == metrics.precision_recall(
      ref, sample, distances='float16')
  ours = metrics.precision_recall(ref, sample, k=3, batch_size=16)
  assert ours == pytest.approx(_naive_adm_float16_pr(ref, sample, 3), abs=1e-12)
  r16 = metrics.manifold_radii(ref, k=3)
  r32 = metrics.manifold_radii(ref, k=3, distances='float32')
  assert np.all(r16.astype(np.float16) == r16)  # float16 values
  assert not np.array_equal(r16, r32)
  np.testing.assert_allclose(r16, r32, rtol=5e-3)


def test_precision_recall_float16_overflow_falls_back_to_float32():
  """Squared norms beyond float16's 65504 overflow: those blocks are recomputed in float32."""
  rng = np.random.default_rng(4)
  ref, sample = _inception_like(rng, 40) * 40, _inception_like(rng, 30) * 40
  assert (ref.astype(np.float64) ** 2).sum(1).min() > np.finfo(np.float16).max
  assert metrics.precision_recall(ref, sample) == metrics.precision_recall(
      ref, sample, distances='float32')
  np.testing.assert_array_equal(metrics.manifold_radii(ref),
                                metrics.manifold_radii(ref, distances='float32'))
  with pytest.raises(ValueError, match='float16'):
    metrics.precision_recall(ref, sample, distances='half')


def test_precision_recall_limits():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(100, 4))
  assert metrics.precision_recall(x, x) == (1.0, 1.0)
  assert metrics.precision_recall(x, x + 100.0) == (0.0, 0.0)
  # Collapsed samples (all near one reference mode): high precision, low recall.
  p, r = metrics.precision_recall(x, x[0] + 1e-3 * rng.normal(size=(20, 4)))
  assert p == 1.0 and r < 0.05


def test_manifold_radii_is_kth_neighbour_excluding_self():
  x = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
  # Sorted distances from 0: 0 (self), 1, 3, 6 -> k=3 radius 6 (squared 36).
  np.testing.assert_allclose(metrics.manifold_radii(x, k=3, batch_size=2)[0], 36.0)


def test_reference_and_sample_readers(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(7, 8, 8, 3), dtype=np.uint8)
  ref_path = tmp_path / 'ref.npz'
  np.savez_compressed(ref_path, arr_0=images, mu=np.zeros(4, np.float32), sigma=np.eye(4),
                      mu_s=np.ones(3), sigma_s=np.eye(3))
  ref = metrics.load_reference_batch(str(ref_path))
  assert ref.num_images == 7 and ref.mu.dtype == np.float64 and ref.sigma_s.shape == (3, 3)
  batches = list(ref.iter_images(3))
  assert [len(b) for b in batches] == [3, 3, 1]
  np.testing.assert_array_equal(np.concatenate(batches), images)

  sample_path = tmp_path / 'samples.npz'
  np.savez(sample_path, images)
  np.testing.assert_array_equal(np.concatenate(list(metrics.iter_images(str(sample_path), 4))),
                                images)

  with pytest.raises(ValueError, match='missing keys'):
    metrics.load_reference_batch(str(sample_path))
  np.savez(tmp_path / 'float.npz', images.astype(np.float32))
  with pytest.raises(ValueError, match='uint8'):
    list(metrics.iter_images(str(tmp_path / 'float.npz'), 4))
