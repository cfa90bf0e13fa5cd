"""Sanity of the Fashion-MNIST feature metric: real held-out images score low, corrupted ones
high; label accuracy separates true from shuffled labels; the cache is reused and rebuilt."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
from flax import nnx

from ppflow_jax.data import fashion_mnist
from ppflow_jax.evaluation import fmnist_features as fm

if not os.path.exists(os.path.join(fashion_mnist.DEFAULT_PATH, 'train-images-idx3-ubyte.gz')):
  pytest.skip('Fashion-MNIST IDX files not installed', allow_module_level=True)


@functools.cache
def _train_split():
  return fashion_mnist.load('', 'train')


def _held_out(n=2000):
  images, labels = _train_split()
  sl = slice(fm.TRAIN_EXAMPLES, fm.TRAIN_EXAMPLES + n)  # Never seen in training.
  return images[sl].astype(np.float32) / 127.5 - 1, labels[sl]


def _blur(x):
  # 2x2 average-pool then nearest upsampling: loses the fine texture, keeps the silhouette.
  n = len(x)
  pooled = x.reshape(n, 16, 2, 16, 2, 1).mean(axis=(2, 4))
  return np.repeat(np.repeat(pooled, 2, axis=1), 2, axis=2)


def _sanity_checks(ev, min_accuracy):
  x, y = _held_out()
  rng = np.random.default_rng(0)
  real = ev.score(x, y)
  noisy = ev.score(np.clip(x + rng.normal(scale=0.5, size=x.shape), -1, 1).astype(np.float32))
  blurred = ev.score(_blur(x))
  # Measured (150 / 1300 steps): FID real 0.4 / 0.8, blurred 10 / 17, noisy 26 / 73.
  assert real['fid'] < 0.1 * noisy['fid'] and real['fid'] < 0.2 * blurred['fid'], (real, noisy,
                                                                                  blurred)
  assert real['precision'] > 0.7 and real['recall'] > 0.7
  assert noisy['recall'] < 0.5 * real['recall'] and blurred['recall'] < 0.8 * real['recall']
  assert real['accuracy_of_labels'] > min_accuracy
  shuffled = ev.score(x, rng.permutation(y))['accuracy_of_labels']
  assert shuffled < 0.2
  return real, noisy, blurred


@pytest.fixture(scope='module')
def tiny_evaluator(tmp_path_factory):
  return fm.FMNISTEvaluator(str(tmp_path_factory.mktemp('fmnist')), train_steps=150)


def test_tiny_budget_sanity(tiny_evaluator):
  assert tiny_evaluator.test_accuracy > 0.7
  _sanity_checks(tiny_evaluator, min_accuracy=0.7)


def test_features_shape_and_bad_input(tiny_evaluator):
  x, _ = _held_out(10)
  f = tiny_evaluator.features(x)
  assert f.shape == (10, fm.FEATURE_DIM) and f.dtype == np.float32
  with pytest.raises(ValueError, match='uint8'):
    tiny_evaluator.features(np.zeros((2, 32, 32, 1), np.uint8))
  with pytest.raises(ValueError, match=r'\(N, 32, 32, 1\)'):
    tiny_evaluator.features(np.zeros((2, 28, 28, 1), np.float32))
  with pytest.raises(ValueError, match=r'\[-1, 1\]'):
    tiny_evaluator.features(np.full((2, 32, 32, 1), 255.0, np.float32))
  with pytest.raises(ValueError, match='labels'):
    tiny_evaluator.score(x, np.zeros(3))


def test_cache_is_reused_and_rebuilt(tmp_path, monkeypatch):
  calls = []

  def fake_train(steps, seed, **kwargs):  # An untrained network: the cache logic is what's tested.
    calls.append(steps)
    return fm.FMNISTClassifier(rngs=nnx.Rngs(seed + len(calls)))

  monkeypatch.setattr(fm, 'train_classifier', fake_train)
  x, _ = _held_out(50)
  first = fm.FMNISTEvaluator(str(tmp_path), train_steps=7)
  again = fm.FMNISTEvaluator(str(tmp_path), train_steps=7)
  assert calls == [7]
  np.testing.assert_array_equal(first.features(x), again.features(x))

  with open(tmp_path / 'classifier.npz', 'wb') as f:
    f.write(b'not an npz')
  rebuilt = fm.FMNISTEvaluator(str(tmp_path), train_steps=7)
  assert calls == [7, 7]
  # New classifier -> reference statistics recomputed in its feature space.
  np.testing.assert_allclose(rebuilt.score(x)['fid'],
                             fm.FMNISTEvaluator(str(tmp_path), train_steps=7).score(x)['fid'])
  assert not np.array_equal(first.features(x), rebuilt.features(x))
  fm.FMNISTEvaluator(str(tmp_path), train_steps=8)  # Different budget: retrain.
  assert calls == [7, 7, 8]


@pytest.mark.slow
def test_default_classifier_accuracy_and_sanity(tmp_path):
  ev = fm.FMNISTEvaluator(str(tmp_path))
  assert ev.test_accuracy >= 0.88
  _sanity_checks(ev, min_accuracy=0.85)
