"""The stage schedule: which patch size and CFG scale serve which part of the time axis [0, 1].

Time follows SiT/PPFlow: t = 0 is noise, t = 1 is data. Stage 0 is the coarsest (largest patch,
high noise); the last stage uses the finest patch. A time exactly on a boundary belongs to the
coarser stage, as in the official PPFlow sampler (`t <= 0.5` -> coarsest).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Sequence

import ml_collections


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: times in (t_start, t_end] (stage 0 includes t = 0), patch (rows, cols), CFG scale."""
  index: int
  t_start: float
  t_end: float
  patch: tuple[int, int]
  cfg_scale: float

  @property
  def patch_area(self) -> int:
    return self.patch[0] * self.patch[1]


@dataclasses.dataclass(frozen=True)
class Schedule:
  """An ordered, validated list of stages over a latent of (height, width) positions."""
  stages: tuple[Stage, ...]
  latent_hw: tuple[int, int]

  def __post_init__(self):
    _validate(self.stages, self.latent_hw)

  @property
  def boundaries(self) -> tuple[float, ...]:
    return tuple(s.t_end for s in self.stages[:-1])

  @property
  def finest(self) -> Stage:
    return self.stages[-1]

  def __len__(self) -> int:
    return len(self.stages)

  def stage_index(self, t: float) -> int:
    """Stage of time t; a time on a boundary belongs to the coarser stage (`bisect_left`)."""
    if not 0.0 <= t <= 1.0:
      raise ValueError(f'time {t} is outside [0, 1]')
    return bisect.bisect_left(self.boundaries, t)

  def num_tokens(self, stage: int) -> int:
    ph, pw = self.stages[stage].patch
    return (self.latent_hw[0] // ph) * (self.latent_hw[1] // pw)

  def token_grid(self, stage: int) -> tuple[int, int]:
    ph, pw = self.stages[stage].patch
    return self.latent_hw[0] // ph, self.latent_hw[1] // pw

  def bucket_sizes(self, batch_size: int) -> tuple[int, ...]:
    """Samples per stage in a training batch, proportional to each stage's time range.

    Largest-remainder rounding keeps the total equal to `batch_size` (50/50 for two stages,
    50/25/25 for three, as the official trainer). Every stage gets at least one sample.
    """
    if batch_size < len(self.stages):
      raise ValueError(f'batch size {batch_size} is smaller than the number of stages '
                       f'{len(self.stages)}: every stage needs at least one sample per batch')
    exact = [(s.t_end - s.t_start) * batch_size for s in self.stages]
    sizes = [max(1, math.floor(e)) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: sizes[i] - exact[i])
    i = 0
    while sum(sizes) != batch_size:
      j = order[i % len(order)]
      if sum(sizes) < batch_size:
        sizes[j] += 1
      elif sizes[j] > 1:
        sizes[j] -= 1
      i += 1
    return tuple(sizes)


def _validate(stages: Sequence[Stage], latent_hw: tuple[int, int]) -> None:
  if not stages:
    raise ValueError('the stage schedule is empty: give at least one stage')
  h, w = latent_hw
  if stages[0].t_start != 0.0 or stages[-1].t_end != 1.0:
    raise ValueError(f'stage time ranges must tile [0, 1]; they start at {stages[0].t_start} '
                     f'and end at {stages[-1].t_end}')
  for prev, cur in zip(stages, stages[1:]):
    if cur.t_start != prev.t_end:
      raise ValueError(f'stage {cur.index} starts at {cur.t_start} but stage {prev.index} ends '
                       f'at {prev.t_end}: ranges must tile [0, 1] without gaps or overlaps')
  for s in stages:
    if not s.t_start < s.t_end:
      raise ValueError(f'stage {s.index} has an empty or reversed range ({s.t_start}, {s.t_end}]: '
                       'boundaries must be strictly increasing inside (0, 1)')
    ph, pw = s.patch
    if ph <= 0 or pw <= 0 or h % ph or w % pw:
      raise ValueError(f'stage {s.index} patch {s.patch} (rows, cols) does not divide the '
                       f'{h}x{w} latent grid')
    if s.cfg_scale < 0:
      raise ValueError(f'stage {s.index} has a negative CFG scale {s.cfg_scale}')
  fh, fw = stages[-1].patch
  for s in stages[:-1]:
    ph, pw = s.patch
    if ph % fh or pw % fw:
      raise ValueError(f'stage {s.index} patch {s.patch} is not a multiple of the finest patch '
                       f'{(fh, fw)}: the finest stage must be last, and coarse patches must be '
                       'unions of finest patches (positional embeddings and SiT init need it)')
    if ph * pw == fh * fw:
      raise ValueError(f'stage {s.index} patch {s.patch} is as fine as the last stage {(fh, fw)}; '
                       'order stages from coarsest (t = 0) to finest (t = 1)')


def from_config(config: ml_collections.ConfigDict) -> Schedule:
  """Builds and validates the schedule of `config.schedule` over `config.latent`."""
  sc = config.schedule
  boundaries = tuple(float(b) for b in sc.boundaries)
  patches = tuple(tuple(int(v) for v in p) for p in sc.patch_sizes)
  scales = tuple(float(s) for s in sc.cfg_scales)
  n = len(patches)
  if any(len(p) != 2 for p in patches):
    raise ValueError(f'config.schedule.patch_sizes={sc.patch_sizes}: each patch must be a '
                     '(rows, cols) pair')
  if len(boundaries) != n - 1:
    raise ValueError(f'config.schedule has {n} patch sizes but {len(boundaries)} boundaries; '
                     f'{n} stages need {n - 1} interior boundaries in (0, 1)')
  if len(scales) != n:
    raise ValueError(f'config.schedule has {n} patch sizes but {len(scales)} cfg_scales')
  if any(not 0.0 < b < 1.0 for b in boundaries) or list(boundaries) != sorted(set(boundaries)):
    raise ValueError(f'config.schedule.boundaries={boundaries} must be strictly increasing '
                     'values inside (0, 1)')
  edges = (0.0,) + boundaries + (1.0,)
  stages = tuple(Stage(i, edges[i], edges[i + 1], patches[i], scales[i]) for i in range(n))
  return Schedule(stages, (config.latent.height, config.latent.width))
