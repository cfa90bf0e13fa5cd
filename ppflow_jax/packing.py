"""Patch n' Pack for stage-bucketed batches, and the bucketed forward pass that uses it.

A batch holds a fixed number of samples per stage, so packing is static: stage s's samples of
L_s tokens go k_s = L_max / L_s to a row of the finest length L_max (four 64-token samples per
256-token row at 4x4 vs 2x2 on a 32x32 latent). A stage whose count does not fill its last row
leaves a padding segment there. Each token carries its row-local segment id (1..k_s; 0 = padding,
masked in attention and never read back) and gets its own sample's adaLN modulation (t, y,
level), broadcast over the sample's equal-length segment of its row. Stages never share a row, so at most one row
per stage is partly padding. Positions are added per stage before packing (PPFModel.embed).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ppflow_jax.models import dit


@dataclasses.dataclass(frozen=True)
class PackPlan:
  """Static packing of buckets with `counts[s]` samples of `lengths[s]` tokens into rows.

  `row_multiple` rounds the row count up (to the mesh's batch shards, so that every shard gets
  whole rows and the per-shard attention kernels see equal batches); the added rows are padding
  after the last stage's rows.
  """
  counts: tuple[int, ...]
  lengths: tuple[int, ...]
  row_multiple: int = 1

  @property
  def row_length(self) -> int:
    return max(self.lengths)

  def per_row(self, s: int) -> int:
    return self.row_length // self.lengths[s]

  def _filled_rows(self, s: int) -> int:
    return math.ceil(self.counts[s] / self.per_row(s))

  def rows(self, s: int) -> int:
    """Rows of stage s (the last stage's include the rows added for `row_multiple`)."""
    if s != len(self.counts) - 1:
      return self._filled_rows(s)
    filled = sum(self._filled_rows(i) for i in range(len(self.counts)))
    return self._filled_rows(s) + (-filled) % self.row_multiple

  @property
  def num_rows(self) -> int:
    return sum(self.rows(s) for s in range(len(self.counts)))

  @property
  def padding_fraction(self) -> float:
    real = sum(n * l for n, l in zip(self.counts, self.lengths))
    return 1.0 - real / (self.num_rows * self.row_length)

  def layout(self) -> dit.TokenLayout:
    """Segment ids (num_rows, row_length) and the static row groups of each stage."""
    seg = []
    for s, (n, length) in enumerate(zip(self.counts, self.lengths)):
      k, rows = self.per_row(s), self.rows(s)
      slot = np.arange(rows * k).reshape(rows, k)  # sample slot of each (row, position in row)
      seg.append(np.repeat(np.where(slot < n, np.arange(1, k + 1)[None], 0), length, axis=1))
    groups = tuple((self.rows(s), self.per_row(s), l, n)
                   for s, (n, l) in enumerate(zip(self.counts, self.lengths)))
    return dit.TokenLayout(jnp.asarray(np.concatenate(seg), jnp.int32), groups)


def make_plan(counts: tuple[int, ...], lengths: tuple[int, ...],
              row_multiple: int = 1) -> PackPlan:
  """Plans `counts[s]` samples of `lengths[s]` tokens per stage into rows of max(lengths)."""
  if len(counts) != len(lengths) or not counts:
    raise ValueError(f'need one count per token length; got counts={counts}, lengths={lengths}')
  if min(counts) < 1 or min(lengths) < 1 or row_multiple < 1:
    raise ValueError(f'counts={counts}, lengths={lengths} and row_multiple={row_multiple} must '
                     'be positive')
  longest = max(lengths)
  for n, length in zip(counts, lengths):
    if longest % length:
      raise ValueError(f'cannot pack {length}-token samples into {longest}-token rows: '
                       'every stage token count must divide the finest one')
  return PackPlan(tuple(counts), tuple(lengths), row_multiple)


def pack(plan: PackPlan, tokens: list[jax.Array]) -> jax.Array:
  """tokens[s]: (counts[s], lengths[s], d) -> (num_rows, row_length, d)."""
  rows = []
  for s, x in enumerate(tokens):
    k, r = plan.per_row(s), plan.rows(s)
    x = jnp.pad(x, ((0, r * k - x.shape[0]), (0, 0), (0, 0)))
    rows.append(x.reshape(r, plan.row_length, x.shape[-1]))
  return jnp.concatenate(rows)


def unpack(plan: PackPlan, packed: jax.Array) -> list[jax.Array]:
  """packed: (num_rows, row_length, d) -> [(counts[s], lengths[s], d)], padding dropped."""
  out, start = [], 0
  for s, (n, length) in enumerate(zip(plan.counts, plan.lengths)):
    r = plan.rows(s)
    x = packed[start:start + r].reshape(r * plan.per_row(s), length, packed.shape[-1])
    out.append(x[:n])
    start += r
  return out


def bucketed_forward(model, xs: list[jax.Array], ts: list[jax.Array], ys: list[jax.Array],
                     packed: bool, stages: Sequence[int] | None = None, *,
                     row_multiple: int = 1) -> list[jax.Array]:
  """Velocity of every bucket: xs[i]: (n_i, H, W, C), ts[i]/ys[i]: (n_i,) -> [(n_i, H, W, C)].

  Bucket i runs model stage `stages[i]` (default: bucket i is stage i, the training layout; the
  sampler's FlexiDiT guidance packs a fine and a coarse pass of the same images this way).
  Packed: one pass of the shared blocks over all buckets' tokens packed into finest-length rows.
  Unpacked: one forward per bucket. Both compute the same function (tested). Models without the
  piecewise API (MPDiT, one stage and no shared token stream to pack) run whole per bucket.
  `row_multiple`: see PackPlan (the trainer passes its mesh's number of batch shards).
  """
  stages = tuple(range(len(xs))) if stages is None else tuple(stages)
  if len(stages) != len(xs):
    raise ValueError(f'{len(xs)} buckets but {len(stages)} stage indices')
  buckets = range(len(xs))
  if not hasattr(model, 'run_blocks'):
    return [model(xs[i], ts[i], ys[i], stages[i]) for i in buckets]
  cs = [model.condition(ts[i], ys[i], stages[i]) for i in buckets]
  tokens = [model.embed(xs[i], stages[i]) for i in buckets]
  if packed:
    plan = make_plan(tuple(x.shape[0] for x in xs), tuple(t.shape[1] for t in tokens),
                     row_multiple)
    ids = jnp.concatenate([jnp.full((x.shape[0],), stages[i], jnp.int32)
                           for i, x in enumerate(xs)])
    out = model.run_blocks(pack(plan, tokens), jnp.concatenate(cs), plan.layout(), ids)
    tokens = unpack(plan, out)
  else:
    tokens = [model.run_blocks(tokens[i], cs[i], stages=jnp.full((xs[i].shape[0],), stages[i]))
              for i in buckets]
  return [model.unembed(tokens[i], cs[i], stages[i]) for i in buckets]
