"""Fashion-MNIST from the IDX files of Debian's `dataset-fashion-mnist`, as 32x32x1 images in [-1, 1].

The embedded default trains the flow model directly on these images (no VAE): 28x28 is padded with
2 background pixels on each side (pixel 0, i.e. -1 after scaling) so the side divides every patch size.
"""

from __future__ import annotations

import gzip

import numpy as np

from ppflow_jax import paths

DEFAULT_PATH = '/usr/share/datasets/fashion-mnist'
_FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
          'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}
SHAPE = (32, 32, 1)
NUM_CLASSES = 10


def _read_idx(file: str, magic: int) -> np.ndarray:
  """Reads a gzipped IDX file (big-endian int32 header: magic, dims...) into a uint8 array."""
  data = gzip.decompress(paths.read_bytes(file))
  got = int.from_bytes(data[:4], 'big')
  if got != magic:
    raise ValueError(f'{file}: IDX magic {got}, expected {magic}; the file is not Fashion-MNIST')
  ndim = magic & 0xFF
  dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(path: str = '', split: str = 'train') -> tuple[np.ndarray, np.ndarray]:
  """Returns images uint8 (N, 32, 32, 1) padded with zeros, and labels int32 (N,).

  Args:
    path: directory of the .gz IDX files (a local path or a URL); '' = the Debian package location.
    split: 'train' (60000) or 'test' (10000).
  """
  if split not in _FILES:
    raise ValueError(f'Fashion-MNIST split {split!r} must be one of {list(_FILES)}')
  path = path or DEFAULT_PATH
  files = [paths.join(path, f) for f in _FILES[split]]
  missing = [f for f in files if not paths.exists(f)]
  if missing:
    raise FileNotFoundError(
        f'Fashion-MNIST files not found: {missing}. Install them with '
        '`sudo apt-get install dataset-fashion-mnist` (files go to '
        f'{DEFAULT_PATH}), or set --config.data.path to a directory holding {list(_FILES[split])}.')
  images = _read_idx(files[0], 2051)
  labels = _read_idx(files[1], 2049).astype(np.int32)
  if len(images) != len(labels):
    raise ValueError(f'{path}: {len(images)} images but {len(labels)} labels')
  images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]
  return images, labels


class FashionMNISTSource:
  """In-memory Fashion-MNIST with a vectorized get_batch."""

  def __init__(self, path: str = '', split: str = 'train'):
    self.images, self.labels = load(path, split)

  def __len__(self) -> int:
    return len(self.images)

  def get_batch(self, indices: np.ndarray) -> dict:
    """indices: (B,) -> {'x': float32 (B, 32, 32, 1) in [-1, 1], 'y': int32 (B,)}."""
    return {'x': self.images[indices].astype(np.float32) / 127.5 - 1.0, 'y': self.labels[indices]}
