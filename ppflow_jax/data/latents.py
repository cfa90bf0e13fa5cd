"""The latent shard format written by `extract.py`, and the grain source that reads it.

A latent directory holds `meta.json`, ArrayRecord shards `latents-KKKKK-of-NNNNN.array_record` and
per-shard index files `latents-KKKKK-of-NNNNN.index.npy`. Shard k holds images
[k * shard_size, min((k + 1) * shard_size, num_images)) of the source, in order. Each record is

  int64 image index | int32 label | float32 moments (views, 2, h, w, c), C order, little endian

with views = 2 when flips were extracted (view 0: the image, view 1: the horizontally flipped image)
and the 2 rows the posterior (mean, logvar) of the VAE, UNSCALED. The loader draws a view (a flip
with probability 1/2 if config.data.flip), samples z = mean + exp(logvar / 2) * eps as SiT/DiT do,
and returns z * config.vae.scaling_factor, the model input.
"""

from __future__ import annotations

import json

import grain
import numpy as np

from ppflow_jax import errors
from ppflow_jax import paths

FORMAT = 'ppflow-latents-v1'
META = 'meta.json'
_HEADER = 12  # int64 index + int32 label.


def shard_name(shard: int, num_shards: int) -> str:
  return f'latents-{shard:05d}-of-{num_shards:05d}.array_record'


def index_name(shard: int, num_shards: int) -> str:
  return f'latents-{shard:05d}-of-{num_shards:05d}.index.npy'


def encode_record(index: int, label: int, moments: np.ndarray) -> bytes:
  """moments: float32 (views, 2, h, w, c) -> one record."""
  return (np.int64(index).astype('<i8').tobytes() + np.int32(label).astype('<i4').tobytes()
          + np.ascontiguousarray(moments, '<f4').tobytes())


def decode_record(record: bytes, moments_shape: tuple[int, ...]) -> tuple[int, int, np.ndarray]:
  """Inverse of `encode_record`: (index, label, moments (views, 2, h, w, c))."""
  index = int(np.frombuffer(record, '<i8', 1)[0])
  label = int(np.frombuffer(record, '<i4', 1, offset=8)[0])
  moments = np.frombuffer(record, '<f4', offset=_HEADER).reshape(moments_shape)
  return index, label, moments


def array_record_can_read(path: str) -> bool:
  """array_record opens shards with its own file layer (riegeli), not epath: local files, and
  gs:// objects through its Cloud Storage client. Any other URL reads as an empty file."""
  return not paths.is_url(path) or path.startswith('gs://')


def read_meta(path: str) -> dict:
  """Reads and checks `path/meta.json` of a complete extraction."""
  file = paths.join(path, META)
  if not paths.exists(file):
    raise FileNotFoundError(f'{file} not found: config.data.path must be a directory written by '
                            '`python -m ppflow_jax.data.extract --out=DIR`')
  meta = json.loads(paths.read_text(file))
  if meta.get('format') != FORMAT:
    raise ValueError(f'{file}: format {meta.get("format")!r}, expected {FORMAT!r}')
  if not meta.get('complete'):
    raise ValueError(f'{path}: the extraction has not finished (meta.json complete=false); rerun '
                     'the same extract command to resume it')
  return meta


class LatentSource:
  """Random-access source over the shards: element i is image i as {'moments', 'y'}."""

  def __init__(self, path: str):
    if not array_record_can_read(path):
      raise errors.UserError(
          f'config.data.path={path!r}: array_record reads latent shards from local paths and '
          'gs:// only; copy them to a local disk or a gs:// bucket, or mount the store locally')
    self.meta = read_meta(path)
    n = self.meta['num_shards']
    files = [paths.join(path, shard_name(k, n)) for k in range(n)]
    absent = [f for f in files if not paths.exists(f)]
    if absent:
      raise FileNotFoundError(f'{path}: {len(absent)} latent shards missing, e.g. {absent[:3]}')
    self._records = grain.sources.ArrayRecordDataSource(files)
    if len(self._records) != self.meta['num_images']:
      raise ValueError(f'{path}: {len(self._records)} records, meta.json says '
                       f'{self.meta["num_images"]}')
    self.moments_shape = (self.meta['views'], 2, *self.meta['latent_shape'])

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    """-> {'moments': float32 (views, 2, h, w, c), 'y': int32 ()}."""
    _, label, moments = decode_record(self._records[index], self.moments_shape)
    return {'moments': moments, 'y': np.int32(label)}

  def get_batch(self, indices: np.ndarray) -> dict:
    """indices: (B,) -> {'moments': float32 (B, views, 2, h, w, c), 'y': int32 (B,)}."""
    records = self._records.__getitems__(indices.tolist())
    decoded = [decode_record(r, self.moments_shape) for r in records]
    return {'moments': np.stack([m for _, _, m in decoded]),
            'y': np.asarray([label for _, label, _ in decoded], np.int32)}


class SampleLatent:
  """Batch transform {'moments': (B, views, 2, h, w, c), 'y'} -> {'x': (B, h, w, c) scaled, 'y'}.

  Picks view 1 (the flipped image) with probability 1/2 when flips were stored and `flip`, then
  draws z = mean + exp(logvar / 2) * eps and multiplies by the scaling factor.
  """

  def __init__(self, scaling_factor: float, flip: bool):
    self.scaling_factor = np.float32(scaling_factor)
    self.flip = flip

  def __call__(self, batch: dict, rng: np.random.Generator) -> dict:
    m = batch['moments']
    view = np.zeros(len(m), np.int64)
    if self.flip and m.shape[1] == 2:
      view = (rng.random(len(m)) < 0.5).astype(np.int64)
    mean, logvar = m[np.arange(len(m)), view].swapaxes(0, 1)  # each (B, h, w, c)
    eps = rng.standard_normal(mean.shape, np.float32)
    return {'x': (mean + np.exp(0.5 * logvar) * eps) * self.scaling_factor, 'y': batch['y']}


def latent_shape(path: str) -> tuple[int, int, int]:
  """(h, w, c) of the latents in `path`."""
  return tuple(read_meta(path)['latent_shape'])
