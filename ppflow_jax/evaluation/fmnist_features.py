"""A real quality metric for the embedded Fashion-MNIST default: a small CNN classifier whose
penultimate 128-d features give FID / precision / recall through the same code as the Inception
metrics (`metrics.py`), against the 10k Fashion-MNIST test images.

The classifier trains in about a minute on a 2-core CPU on the first 55,000 training images (the
last 5,000 stay held out, useful as "real samples" for sanity checks) and is cached with the
reference statistics in a directory (`<workdir>/fmnist_classifier/`). A missing, corrupt or
differently configured cache is rebuilt. These numbers are only comparable between runs that use
the same cached classifier; they are not Inception FIDs.
"""

from __future__ import annotations

import hashlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from ppflow_jax import paths
from ppflow_jax.data import fashion_mnist
from ppflow_jax.evaluation import metrics

_PR_DISTANCES = 'float16'  # precision/recall distances, as ADM's evaluator.
ARCH_VERSION = 1           # Bump when the classifier or its training changes: invalidates caches.
TRAIN_EXAMPLES = 55_000    # First 55k train images; the rest are held out.
DEFAULT_TRAIN_STEPS = 1300  # ~3 epochs at batch 128: >= 88% test accuracy (see docs/evaluation.md).
FEATURE_DIM = 128
_CLASSIFIER_FILE = 'classifier.npz'
_REFERENCE_FILE = 'reference.npz'


class FMNISTClassifier(nnx.Module):
  """Strided CNN: (B, 32, 32, 1) in [-1, 1] -> 128-d ReLU features -> 10 logits."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 32, (5, 5), strides=2, rngs=rngs)     # 16x16
    self.conv2 = nnx.Conv(32, 64, (3, 3), strides=2, rngs=rngs)    # 8x8
    self.conv3 = nnx.Conv(64, 128, (3, 3), strides=2, rngs=rngs)   # 4x4
    self.dense = nnx.Linear(4 * 4 * 128, FEATURE_DIM, rngs=rngs)
    self.head = nnx.Linear(FEATURE_DIM, fashion_mnist.NUM_CLASSES, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """x: (B, 32, 32, 1) -> (B, 128) penultimate features."""
    for conv in (self.conv1, self.conv2, self.conv3):
      x = nnx.relu(conv(x))
    return nnx.relu(self.dense(x.reshape(x.shape[0], -1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, 32, 32, 1) -> (B, 10) logits."""
    return self.head(self.features(x))


def _to_float(images_uint8: np.ndarray) -> np.ndarray:
  return images_uint8.astype(np.float32) / 127.5 - 1.0


def _batched(fn, x: np.ndarray, batch_size: int) -> np.ndarray:
  """Applies a jitted `fn` to `x` in zero-padded batches (one compiled shape)."""
  outs = []
  for s in range(0, len(x), batch_size):
    chunk = x[s:s + batch_size]
    padded = np.zeros((batch_size, *x.shape[1:]), x.dtype)
    padded[:len(chunk)] = chunk
    outs.append(np.asarray(fn(padded))[:len(chunk)])
  return np.concatenate(outs)


def train_classifier(steps: int = DEFAULT_TRAIN_STEPS, seed: int = 0, batch_size: int = 128,
                     lr: float = 2e-3, data_path: str = '') -> FMNISTClassifier:
  """Trains the classifier with Adam (cosine decay) on the first TRAIN_EXAMPLES images."""
  images, labels = fashion_mnist.load(data_path, 'train')
  x, y = _to_float(images[:TRAIN_EXAMPLES]), labels[:TRAIN_EXAMPLES]
  model = FMNISTClassifier(rngs=nnx.Rngs(seed))
  tx = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1)))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, xb, yb):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(seed)
  order = np.empty(0, np.int64)
  for _ in range(steps):
    if len(order) < batch_size:  # Epoch-wise shuffling without replacement.
      order = np.concatenate([order, rng.permutation(len(x))])
    idx, order = order[:batch_size], order[batch_size:]
    step(model, optimizer, x[idx], y[idx])
  return model


def _params_to_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
  return {'/'.join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _arrays_to_model(arrays: dict[str, np.ndarray]) -> FMNISTClassifier:
  model = FMNISTClassifier(rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  leaves = []
  for p, v in nnx.to_flat_state(params):
    key = '/'.join(map(str, p))
    if key not in arrays or arrays[key].shape != v.get_value().shape:
      raise ValueError(f'cached classifier lacks {key} or has the wrong shape')
    leaves.append((p, v.replace(jnp.asarray(arrays[key]))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves), rest)


def _file_digest(path: str) -> str:
  return hashlib.sha256(paths.read_bytes(path)).hexdigest()


class FMNISTEvaluator:
  """FID / precision / recall of Fashion-MNIST samples in the cached classifier's feature space.

  Usage:
    ev = FMNISTEvaluator(paths.join(workdir, 'fmnist_classifier'))  # a local path or a URL
    ev.score(samples, labels)  # samples: (N, 32, 32, 1) float in [-1, 1]; labels: (N,) or None.
  """

  def __init__(self, cache_dir: str, train_steps: int = DEFAULT_TRAIN_STEPS, seed: int = 0,
               data_path: str = '', batch_size: int = 500):
    self.cache_dir = cache_dir
    self.batch_size = batch_size
    self._meta = dict(arch_version=ARCH_VERSION, train_steps=train_steps, seed=seed)
    paths.makedirs(cache_dir)
    clf_path = paths.join(cache_dir, _CLASSIFIER_FILE)
    self.model, self.test_accuracy = self._load_classifier(clf_path)
    if self.model is None:
      self.model, self.test_accuracy = self._train_and_cache(clf_path, data_path)
    graphdef, state = nnx.split(self.model)
    self._forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    self._features = jax.jit(lambda s, x: nnx.merge(graphdef, s).features(x))
    self._state = state
    self._ref = self._load_or_build_reference(
        paths.join(cache_dir, _REFERENCE_FILE), _file_digest(clf_path), data_path)

  def _load_classifier(self, path: str):
    if not paths.exists(path):
      return None, None
    try:
      with paths.load_npz(path) as f:
        arrays = {k: f[k] for k in f.files}
      meta = {k: int(arrays.pop(f'meta/{k}')) for k in self._meta}
      if meta != self._meta:
        logging.info('Cached classifier %s has %s, want %s: retraining.', path, meta, self._meta)
        return None, None
      accuracy = float(arrays.pop('meta/test_accuracy'))
      return _arrays_to_model(arrays), accuracy
    except Exception as e:  # Any unreadable cache is rebuilt, never trusted.
      logging.warning('Cached classifier %s is unusable (%s): retraining.', path, e)
      return None, None

  def _train_and_cache(self, path: str, data_path: str):
    t0 = time.time()
    model = train_classifier(self._meta['train_steps'], self._meta['seed'], data_path=data_path)
    images, labels = fashion_mnist.load(data_path, 'test')
    graphdef, state = nnx.split(model)
    logits = _batched(jax.jit(lambda x: nnx.merge(graphdef, state)(x)), _to_float(images), 1000)
    accuracy = float((logits.argmax(-1) == labels).mean())
    logging.info('Fashion-MNIST classifier: %d steps in %.0fs, test accuracy %.4f.',
                 self._meta['train_steps'], time.time() - t0, accuracy)
    meta = {f'meta/{k}': np.int64(v) for k, v in self._meta.items()}
    paths.save_npz(path, **_params_to_arrays(model), **meta,
                     **{'meta/test_accuracy': np.float64(accuracy)})
    return model, accuracy

  def _load_or_build_reference(self, path: str, digest: str, data_path: str) -> dict:
    try:
      with paths.load_npz(path) as f:
        # Radii computed with other distances (older caches: float32) would not match score().
        if (str(f['classifier_sha256']) == digest
            and str(f['radii_distances']) == _PR_DISTANCES):
          return {k: f[k] for k in ('mu', 'sigma', 'features', 'radii')}
    except Exception as e:  # Missing, corrupt or stale: rebuilt below.
      logging.info('Fashion-MNIST reference statistics %s not usable (%s): computing.', path, e)
    images, _ = fashion_mnist.load(data_path, 'test')
    features = self.features(_to_float(images))
    mu, sigma = metrics.feature_stats(features)
    ref = dict(mu=mu, sigma=sigma, features=features,
               radii=metrics.manifold_radii(features, k=3, distances=_PR_DISTANCES))
    paths.save_npz(path, **ref, classifier_sha256=np.array(digest),
                     radii_distances=np.array(_PR_DISTANCES))
    return ref

  @staticmethod
  def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.shape[1:] != fashion_mnist.SHAPE:
      raise ValueError(f'FMNISTEvaluator expects (N, 32, 32, 1) images, got {images.shape}')
    if images.dtype == np.uint8:
      raise ValueError('FMNISTEvaluator expects float images in [-1, 1], got uint8; convert with '
                       'x.astype(np.float32) / 127.5 - 1')
    images = images.astype(np.float32)
    if not np.all(np.isfinite(images)):
      raise ValueError('FMNISTEvaluator: images contain NaN or inf')
    if np.abs(images).max() > 5:
      raise ValueError(f'FMNISTEvaluator expects images in [-1, 1], got range '
                       f'[{images.min():.3g}, {images.max():.3g}] (images in [0, 255]? use '
                       'x / 127.5 - 1)')
    # Samples slightly outside the data range are clipped, as quantizing them to pixels would.
    return np.clip(images, -1.0, 1.0)

  def features(self, images: np.ndarray) -> np.ndarray:
    """images: (N, 32, 32, 1) float in [-1, 1] (clipped) -> (N, 128) float32 features."""
    images = self._check_images(images)
    return _batched(lambda x: self._features(self._state, x), images, self.batch_size)

  def score(self, images: np.ndarray, labels: np.ndarray | None = None,
            fid_draws: int = 0) -> dict:
    """FID, precision and recall (k=3) vs the 10k test images; images: (N >= 2, 32, 32, 1).

    `accuracy_of_labels`: fraction of samples the classifier assigns to their conditioning
    label (None without labels); shuffled or ignored labels give ~0.1. With fid_draws > 0 also
    `fid_std`: the FID's bootstrap standard deviation over that many resamples of the images.
    """
    images = self._check_images(images)
    feats = _batched(lambda x: self._features(self._state, x), images, self.batch_size)
    mu, sigma = metrics.feature_stats(feats)
    precision, recall = metrics.precision_recall(self._ref['features'], feats, k=3,
                                                 distances=_PR_DISTANCES,
                                                 ref_radii=self._ref['radii'])
    out = dict(fid=metrics.fid(mu, sigma, self._ref['mu'], self._ref['sigma']),
               precision=precision, recall=recall, accuracy_of_labels=None)
    if fid_draws:
      out['fid_std'] = metrics.fid_bootstrap_std(feats, self._ref['mu'], self._ref['sigma'],
                                                 fid_draws)
    if labels is not None:
      labels = np.asarray(labels)
      if labels.shape != (len(images),):
        raise ValueError(f'labels must have shape ({len(images)},), got {labels.shape}')
      logits = _batched(lambda x: self._forward(self._state, x), images, self.batch_size)
      out['accuracy_of_labels'] = float((logits.argmax(-1) == labels).mean())
    return out
