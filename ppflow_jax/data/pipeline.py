"""The one grain pipeline every source goes through: per-epoch global shuffle, process sharding,
vectorized batch assembly, per-batch random transform, prefetch.

Element k of the (infinite) grain MapDataset is process p's k-th batch: global stream positions
p + P * (k * B_local + j), j < B_local, where position g is example perm_e[g mod N] of epoch
e = g // N and perm_e is a permutation seeded by (shuffle_seed, e). So the processes' step-k batches
together are global positions [k * B, (k + 1) * B) for any process count P dividing the global batch B.
Batches are assembled by one vectorized `get_batch(indices)` call (no per-example Python overhead), and
the iterator's checkpointable state is the grain position `next_index`.
"""

from __future__ import annotations

import functools
from typing import Callable

import grain
import numpy as np

BatchFn = Callable[[np.ndarray], dict]  # int64 indices (B,) -> dict of (B, ...) arrays.
TransformFn = Callable[[dict, np.random.Generator], dict]


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} must be a positive multiple of '
                     f'process_count={process_count}')
  return global_batch_size // process_count


class _Batches:
  """grain map: local batch number k -> the batch dict (picklable, for grain worker processes)."""

  def __init__(self, num_examples: int, get_batch: BatchFn, transform: TransformFn | None,
               b_local: int, process_index: int, process_count: int, shuffle_seed: int, seed: int):
    self.n, self.get_batch, self.transform = num_examples, get_batch, transform
    self.b_local, self.pi, self.pc = b_local, process_index, process_count
    self.shuffle_seed, self.seed = shuffle_seed, seed

  @functools.lru_cache(maxsize=2)
  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.shuffle_seed, epoch]).permutation(self.n)

  def indices(self, k: int) -> np.ndarray:
    """Source indices (B_local,) of local batch k."""
    g = self.pi + self.pc * (k * self.b_local + np.arange(self.b_local, dtype=np.int64))
    epoch, pos = np.divmod(g, self.n)
    out = np.empty_like(g)
    for e in np.unique(epoch):
      sel = epoch == e
      out[sel] = self._permutation(int(e))[pos[sel]]
    return out

  def __call__(self, k: int) -> dict:
    batch = self.get_batch(self.indices(k))
    if self.transform is not None:
      batch = self.transform(batch, np.random.default_rng([self.seed, self.pi, k]))
    return batch


def make_iterator(
    num_examples: int,
    get_batch: BatchFn,
    *,
    transform: TransformFn | None,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    shuffle_seed: int,
    seed: int,
    num_workers: int = 0,
    prefetch: int = 2,
) -> grain.DatasetIterator:
  """An infinite, checkpointable iterator of batches.

  Args:
    num_examples: N, the source size; indices passed to `get_batch` are in [0, N).
    get_batch: int64 indices (B_local,) -> {'x': (B_local, H, W, C), 'y': (B_local,), ...}.
    transform: (batch, rng) -> batch, with an rng seeded by (seed, process_index, batch number).
    global_batch_size: examples per step over all processes; each process yields 1/process_count.
    shuffle_seed: order of the global stream (a new permutation every epoch).
    seed: seed of `transform`'s randomness.
    num_workers: grain worker processes (0: threads in this process).
    prefetch: batches prepared ahead.

  Returns:
    A grain DatasetIterator of batch dicts; `get_state()` / `set_state()` resume it exactly.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, process_count={process_count})')
  b_local = local_batch_size(global_batch_size, process_count)
  if num_examples < global_batch_size:
    raise ValueError(f'the dataset has {num_examples} examples, fewer than one global batch '
                     f'({global_batch_size}); lower the batch size')
  batches = _Batches(num_examples, get_batch, transform, b_local, process_index, process_count,
                     shuffle_seed, seed)
  read = grain.ReadOptions(num_threads=max(1, prefetch), prefetch_buffer_size=max(1, prefetch))
  ds = grain.MapDataset.range(0, 2**62).map(batches).to_iter_dataset(read)
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(ds)
