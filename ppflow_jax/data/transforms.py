"""Image preprocessing shared by the ImageNet and image-folder sources: ADM center crop, scaling, flip."""

from __future__ import annotations

import concurrent.futures

import numpy as np
from PIL import Image


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
  """ADM/DiT center crop: uint8 (size, size, 3).

  Halves the image with BOX filtering while its short side is >= 2 * size (cheap antialiasing),
  resizes with BICUBIC so the short side is `size`, then crops the center.
  """
  image = image.convert('RGB')
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
  arr = np.asarray(image)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top:top + size, left:left + size]


def to_unit_range(image: np.ndarray) -> np.ndarray:
  """uint8 (..., H, W, C) in [0, 255] -> float32 in [-1, 1]."""
  return image.astype(np.float32) / 127.5 - 1.0


class ImageBatches:
  """get_batch for image sources: decodes and crops the images of a batch in a thread pool.

  `source[i]` gives {'image': uint8 (S, S, 3), 'label'}; PIL releases the GIL while decoding and
  resizing, so threads scale. The pool is created lazily so the object pickles into grain workers.
  """

  def __init__(self, source, num_threads: int = 16):
    self.source, self.num_threads, self._pool = source, num_threads, None

  def __getstate__(self):
    return {**self.__dict__, '_pool': None}

  def __call__(self, indices: np.ndarray) -> dict:
    """indices: (B,) -> {'x': float32 (B, S, S, 3) in [-1, 1], 'y': int32 (B,)}."""
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads)
    examples = list(self._pool.map(self.source.__getitem__, indices.tolist()))
    return {'x': to_unit_range(np.stack([e['image'] for e in examples])),
            'y': np.asarray([e['label'] for e in examples], np.int32)}


def random_flip(batch: dict, rng: np.random.Generator) -> dict:
  """Flips each `batch['x']` (B, H, W, C) image horizontally with probability 1/2."""
  flip = rng.random(len(batch['x'])) < 0.5
  return {**batch, 'x': np.where(flip[:, None, None, None], batch['x'][:, :, ::-1], batch['x'])}
