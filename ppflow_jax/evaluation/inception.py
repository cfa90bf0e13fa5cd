"""The Inception-v3 of FID (the 2015 TensorFlow graph as ported by pytorch-fid) as Flax NNX
modules, its input preprocessing and a feature extractor (weights: convert/inception.py).

Architecture: pytorch-fid's `fid_inception_v3` (torchvision Inception3 layout, NHWC here) with the
TF-compatible blocks: the 3x3 average pools of the A, C and E_1 blocks exclude padding
(`count_include_pad=False`), E_2's pool branch is a 3x3 max pool, and the classifier is the
1008-way fc of the 2015 graph. Module attribute names equal the PyTorch ones, so
`Mixed_6d.branch1x1.conv.kernel` is `Mixed_6d.branch1x1.conv.weight` of the state dict.

Outputs (see `InceptionV3.__call__`):
  pool:    (B, 2048) pool_3, the FID / precision / recall feature.
  spatial: (B, 2023) sFID feature = ADM's `mixed_6/conv:0[..., :7]` flattened: the TF graph's
           `mixed_6` is pytorch-fid's `Mixed_6d` (mixed, mixed_1, mixed_2 = Mixed_5b/c/d,
           mixed_3 = Mixed_6a, ..., mixed_6 = Mixed_6d) and its `conv` is the 1x1 branch
           `branch1x1`; the op carrying the scope name is the ReLU after batch-norm, so we take
           relu(bn(conv)) of `Mixed_6d.branch1x1`, channels 0..6 of its 17x17x192 output,
           flattened in (H, W, C) order as ADM's NHWC reshape does.
  logits:  (B, 1008) pool_3 @ W of the 1008-class fc *without* its bias, as ADM computes the IS
           softmax (`softmax/logits/MatMul`); `logits_bias=True` adds the bias.

Preprocessing (`preprocess`): images (B, H, W, 3) uint8 or float in [0, 255], any size,
bilinearly resized to 299 x 299 and mapped to about [-1, 1]:
  'pytorch_fid': `F.interpolate(bilinear, align_corners=False)` (half-pixel centres)
      and x / 127.5 - 1, as pytorch-fid.
  'tf1' (the evaluation default, `ADM_PREPROCESS`): TF1 `resize_bilinear(align_corners=False)`
      (source = dest * in/out, no half-pixel offset) and (x - 128) / 128, the ops inside the TF
      graph that ADM runs. Emulated, not checked against the graph here (no TensorFlow).
"""

from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv[..., :7].
PREPROCESS_MODES = ('pytorch_fid', 'tf1')
ADM_PREPROCESS = 'tf1'  # the evaluation default: the ADM-closest of PREPROCESS_MODES.


class BasicConv(nnx.Module):
  """conv (no bias) -> batch-norm (running stats, eps 1e-3) -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
               padding: int | tuple[int, int] = 0, *, rngs: nnx.Rngs):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    self.conv = nnx.Conv(cin, cout, kernel, strides=stride, padding=((ph, ph), (pw, pw)),
                         use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(cout, epsilon=1e-3, use_running_average=True, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # TF's SAME average pool divides by the number of valid (non-padded) inputs.
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                      count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
  padding = 'VALID' if stride == 2 else ((1, 1), (1, 1))
  return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class InceptionA(nnx.Module):
  """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

  def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_avg_pool_3x3(x))
    return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """35x35 -> 17x17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), b3, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nnx.Module):
  """17x17 block with factorized 7x7 convolutions; `branch1x1` is the graph's `mixed_N/conv`."""

  def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv(cin, 192, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (block output (B, 17, 17, 768), branch1x1 output (B, 17, 17, 192))."""
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    bp = self.branch_pool(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nnx.Module):
  """17x17 -> 8x8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nnx.Module):
  """8x8 block with split 1x3 / 3x1 outputs; pool branch 'avg' (FIDInceptionE_1) or 'max' (E_2)."""

  def __init__(self, cin: int, pool: str, *, rngs: nnx.Rngs):
    self.pool = pool
    self.branch1x1 = BasicConv(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv(cin, 192, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = _avg_pool_3x3(x) if self.pool == 'avg' else _max_pool_3x3(x, 1)
    return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=-1)


def _resize_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
  """(n_out, n_in) matrix of 1-D bilinear interpolation weights (no antialiasing)."""
  # Source coordinates in float32 arithmetic, as both PyTorch and TF compute them.
  scale = np.float32(n_in) / np.float32(n_out)
  dst = np.arange(n_out, dtype=np.float32)
  if mode == 'pytorch_fid':
    src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
  else:  # tf1: legacy TF resize_bilinear with align_corners=False, half_pixel_centers=False.
    src = dst * scale
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = (src - i0).astype(np.float64)
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), i0), 1 - frac)
  np.add.at(m, (np.arange(n_out), i1), frac)
  return m.astype(np.float32)


def preprocess(images: jax.Array, mode: str = 'pytorch_fid', size: int = 299) -> jax.Array:
  """images: (B, H, W, 3) uint8 or float in [0, 255] -> (B, size, size, 3) float32 in ~[-1, 1]."""
  if mode not in PREPROCESS_MODES:
    raise ValueError(f'preprocess mode {mode!r} is not one of {PREPROCESS_MODES}')
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'Inception expects (B, H, W, 3) RGB images in [0, 255], got {images.shape}'
                     ' (tile grayscale images to 3 channels first)')
  x = images.astype(jnp.float32)
  mh = jnp.asarray(_resize_matrix(images.shape[1], size, mode))
  mw = jnp.asarray(_resize_matrix(images.shape[2], size, mode))
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum('oh,bhwc->bowc', mh, x, precision=hi)
  x = jnp.einsum('pw,bowc->bopc', mw, x, precision=hi)
  return x / 127.5 - 1.0 if mode == 'pytorch_fid' else (x - 128.0) / 128.0


class InceptionV3(nnx.Module):
  """FID Inception-v3; `__call__` maps [0, 255] images to pool / spatial / logits features."""

  def __init__(self, *, preprocess_mode: str = 'pytorch_fid', logits_bias: bool = False,
               rngs: nnx.Rngs):
    if preprocess_mode not in PREPROCESS_MODES:
      raise ValueError(f'preprocess_mode {preprocess_mode!r} is not one of {PREPROCESS_MODES}')
    self.preprocess_mode = preprocess_mode
    self.logits_bias = logits_bias
    self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, 'avg', rngs=rngs)
    self.Mixed_7c = InceptionE(2048, 'max', rngs=rngs)
    self.fc = nnx.Linear(2048, NUM_CLASSES, rngs=rngs)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """images: (B, H, W, 3) in [0, 255] -> pool (B, 2048), spatial (B, 2023), logits (B, 1008)."""
    x = preprocess(images, self.preprocess_mode)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool_3x3(x, 2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = _max_pool_3x3(x, 2)
    x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
    x = self.Mixed_6a(x)
    x, _ = self.Mixed_6b(x)
    x, _ = self.Mixed_6c(x)
    x, mixed_6_conv = self.Mixed_6d(x)
    x, _ = self.Mixed_6e(x)
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
    pool = x.mean(axis=(1, 2))
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
    logits = jnp.dot(pool, self.fc.kernel[...], precision=jax.lax.Precision.HIGHEST)
    if self.logits_bias:
      logits = logits + self.fc.bias[...]
    return dict(pool=pool, spatial=spatial, logits=logits)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> dict[str, jax.Array]:
  with jax.default_matmul_precision('float32'):
    return nnx.merge(graphdef, state)(x)


def extract_features(model: InceptionV3, batches: Iterable[np.ndarray],
                     batch_size: int) -> dict[str, np.ndarray]:
  """Runs `model` over (b <= batch_size, H, W, 3) image batches -> concatenated float32 features.

  Batches are zero-padded to `batch_size` so one program is compiled (and reused across calls
  for the same image size); convolutions run at full float32 precision (no TF32 / bf16 passes
  on accelerators).
  """
  graphdef, state = nnx.split(model)
  run = functools.partial(_forward, graphdef)
  outs = {}
  for batch in batches:
    n = len(batch)
    if n > batch_size:
      raise ValueError(f'batch of {n} images exceeds batch_size={batch_size}')
    padded = np.zeros((batch_size, *batch.shape[1:]), batch.dtype)
    padded[:n] = batch
    for k, v in run(state, padded).items():
      outs.setdefault(k, []).append(np.asarray(v[:n]))
  if not outs:
    raise ValueError('extract_features got no images')
  return {k: np.concatenate(v) for k, v in outs.items()}
