"""Fixed-grid samplers (Euler, Heun, Euler-Maruyama) with stage-wise CFG, one program per stage.

Time runs from t = 0 (noise) to t = 1 (data). Every model evaluation at time t uses the patch of
t's stage (a boundary time belongs to the coarser stage, as in the official sampler) and that
stage's CFG scale. Consecutive evaluations of the same stage and CFG scale form a *segment*, run
as one jitted `fori_loop`: a whole sampling run compiles one XLA program per segment and never
returns to the host between steps. A Heun step whose second evaluation falls in the next segment
is split: its first half ends one segment and its second half opens the next one.
`evaluations()` lists every model evaluation as the segments run it; every count of evaluations,
forward passes and FLOPs (flops.py, the benchmarks, the report) derives from it.

Published behaviour, reproducible by config (`config.sample`):
- ODE `heun` over `linspace(0, 1, 250)` (249 steps, 498 evaluations): the official PPFlow default.
- `sde`: SiT's Euler-Maruyama with diffusion `norm * (1 - t)`, on `linspace(0, 1 - 0.04, n)`,
  then one deterministic mean step of 0.04 (SiT's FID-50K setting).
- `cfg_channels='legacy'` guides latent channels 0..2 only and keeps the conditional velocity
  on channel 3, as SiT/DiT/PPFlow's `forward_with_cfg` (scale s on 3 channels ~ 1 + 3/4 (s - 1)
  on 4). The default 'all' guides every channel.
- `guidance='weak_conditional'` (FlexiDiT §3.4): where the stage's patch is finer than stage
  `guidance_stage`'s, the guidance pass is the *conditional* prediction with that coarser patch,
  v = v_c(p_guid) + s (v_c(p_cond) - v_c(p_guid)); elsewhere (p_cond = p_guid) it is standard CFG.
  Both passes share one packed forward (FlexiDiT appendix B.2, packing.bucketed_forward).

Helpers beside the sampler: `index_noise` (sample i's noise and SDE key depend only on
(seed, i), so results do not depend on batching), `sample_in_chunks` and `steady_seconds`
(timing without compilation). `inference.Inference` builds samplers for a model's weights.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ppflow_jax import packing
from ppflow_jax import stages as stages_lib
from ppflow_jax.models import lora

LEGACY_GUIDED_CHANNELS = 3
ADAPTIVE = 'dopri5'  # the adaptive method (adaptive.py); every other method has a fixed grid


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """What a sampling run does; every field changes published numbers."""
  method: str = 'heun'            # 'euler' | 'heun' | 'sde' | 'dopri5' (adaptive.py)
  num_steps: int = 250            # grid points, both ends included
  cfg_channels: str = 'all'       # 'all' | 'legacy'
  skip_unit_cfg: bool = True      # scale 1.0: conditional pass only
  sde_last_step: float = 0.04
  sde_diffusion_norm: float = 1.0
  force_finest: bool = False      # finest patch at every t (CFG scales still follow time)
  guidance: str = 'cfg'           # 'cfg' | 'weak_conditional' (FlexiDiT weak-model guidance)
  guidance_stage: int = 0         # 'weak_conditional': the stage whose patch gives the guidance
  pack_guidance: bool = True      # 'weak_conditional': both passes in one packed forward
  atol: float = 1e-6              # 'dopri5' error tolerances (SiT's defaults)
  rtol: float = 1e-3

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **overrides) -> 'SamplerSpec':
    s = config.sample
    fields = dict(method=s.method, num_steps=s.num_steps, cfg_channels=s.cfg_channels,
                  skip_unit_cfg=s.skip_unit_cfg, sde_last_step=s.sde_last_step,
                  sde_diffusion_norm=s.sde_diffusion_norm, force_finest=s.force_finest,
                  guidance=s.guidance, guidance_stage=s.guidance_stage, atol=s.atol,
                  rtol=s.rtol)
    fields.update(overrides)
    return cls(**fields)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The integration steps: step i starts at t[i] and moves by dt[i] (all float64 on host)."""
  t: np.ndarray
  dt: np.ndarray
  noise: np.ndarray  # 1.0 where Euler-Maruyama adds noise (SDE only)


def integration_steps(spec: SamplerSpec) -> Steps:
  """The fixed grid of `spec` as steps (t_i, dt_i)."""
  if spec.method == ADAPTIVE:
    raise ValueError("sample.method='dopri5' has no fixed grid: its model evaluations depend on "
                     'the data; build it with adaptive.make_sampler and read the NFE it measured '
                     '(AdaptiveSampler.last_stats)')
  n = spec.num_steps
  if spec.method == 'sde':
    grid = np.linspace(0.0, 1.0 - spec.sde_last_step, n)
    t = grid
    dt = np.append(np.diff(grid), spec.sde_last_step)
    noise = np.append(np.ones(n - 1), 0.0)
    return Steps(t, dt, noise)
  grid = np.linspace(0.0, 1.0, n)
  return Steps(grid[:-1], np.diff(grid), np.zeros(n - 1))


@dataclasses.dataclass(frozen=True)
class Segment:
  """Steps [start, stop) evaluated with one model stage and CFG scale (static per program)."""
  stage: int
  start: int
  stop: int
  finish_pending: bool = False  # opens by completing a Heun step begun in the previous segment
  begin_crossing: bool = False  # ends by starting a Heun step whose corrector is in the next
  guided: bool = True           # runs the guidance pass (its scale is not a skipped 1.0)


def cfg_scale(schedule: stages_lib.Schedule, t: float) -> float:
  """The CFG scale of time t: that of t's stage in the schedule (also when forcing the finest)."""
  return schedule.stages[schedule.stage_index(min(t, 1.0))].cfg_scale


def guidance_stage(spec: SamplerSpec, stage: int) -> int:
  """The stage whose patch runs the guidance pass of an evaluation at `stage` (FlexiDiT's weak
  guidance uses a coarser one; standard CFG the same)."""
  weak = spec.guidance == 'weak_conditional' and spec.guidance_stage < stage
  return spec.guidance_stage if weak else stage


def _eval_key(schedule: stages_lib.Schedule, spec: SamplerSpec, t: float) -> tuple[int, float]:
  """(model stage, CFG scale) of an evaluation at t: a segment holds one key."""
  stage = len(schedule) - 1 if spec.force_finest else schedule.stage_index(min(t, 1.0))
  return stage, cfg_scale(schedule, t)


def plan(schedule: stages_lib.Schedule, spec: SamplerSpec) -> list[Segment]:
  """Splits the steps of `spec` into segments of one model stage and one CFG scale each.

  Segments split where the stage changes and also where the scale changes, so a run forced to the
  finest patch skips the unconditional pass exactly where the stage schedule does (scale 1.0 with
  `skip_unit_cfg`): the two are compared like for like.
  """
  steps = integration_steps(spec)
  t_end = steps.t + steps.dt
  n = len(steps.t)
  first = [_eval_key(schedule, spec, t) for t in steps.t]
  second = [_eval_key(schedule, spec, t) for t in t_end] if spec.method == 'heun' else first

  segments, i, pending = [], 0, False
  while i < n or pending:
    key = second[i - 1] if pending else first[i]
    j = i
    while j < n and first[j] == key and second[j] == key:
      j += 1
    crossing = j < n and first[j] == key and second[j] != key
    guided = not (spec.skip_unit_cfg and key[1] == 1.0)
    segments.append(Segment(key[0], i, j, pending, crossing, guided))
    pending = crossing
    i = j + 1 if crossing else j
  return segments


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One model evaluation as the sampler runs it: the conditional pass at `stage` and, if
  `guide_stage` is not None, the guidance pass (unconditional, or FlexiDiT's weak one) there."""
  t: float
  stage: int
  cfg_scale: float
  guide_stage: int | None


def evaluations(schedule: stages_lib.Schedule, spec: SamplerSpec) -> list[Evaluation]:
  """Every model evaluation of one sampling run, in the order the sampler's segments run them.

  The single count behind `num_evaluations`, `forward_passes`, flops.py and the benchmarks.
  """
  steps = integration_steps(spec)
  t_end = steps.t + steps.dt
  out = []
  for seg in plan(schedule, spec):
    times = [t_end[seg.start - 1]] if seg.finish_pending else []
    for k in range(seg.start, seg.stop):
      times += [steps.t[k], t_end[k]] if spec.method == 'heun' else [steps.t[k]]
    times += [steps.t[seg.stop]] if seg.begin_crossing else []
    guide = guidance_stage(spec, seg.stage) if seg.guided else None
    out += [Evaluation(float(t), seg.stage, cfg_scale(schedule, t), guide) for t in times]
  return out


def num_evaluations(schedule: stages_lib.Schedule, spec: SamplerSpec) -> list[int]:
  """Model evaluations per model stage in one sampling run (conditional passes; no CFG doubling)."""
  counts = [0] * len(schedule)
  for e in evaluations(schedule, spec):
    counts[e.stage] += 1
  return counts


def forward_passes(schedule: stages_lib.Schedule, spec: SamplerSpec) -> list[int]:
  """Forward passes per stage as run: every evaluation's conditional pass plus its guidance pass
  (CFG's unconditional one, skipped at scale 1.0 with `skip_unit_cfg`; or the weak patch's)."""
  counts = [0] * len(schedule)
  for e in evaluations(schedule, spec):
    counts[e.stage] += 1
    if e.guide_stage is not None:
      counts[e.guide_stage] += 1
  return counts


def check_guidance(schedule: stages_lib.Schedule, spec: SamplerSpec) -> None:
  """Raises ValueError for a guidance mode or guidance stage the schedule cannot run."""
  if spec.guidance not in ('cfg', 'weak_conditional'):
    raise ValueError(f"sample guidance={spec.guidance!r} must be 'cfg' or 'weak_conditional'")
  if spec.guidance == 'weak_conditional' and not 0 <= spec.guidance_stage < len(schedule):
    raise ValueError(f'sample guidance_stage={spec.guidance_stage} is not a stage of the '
                     f'{len(schedule)}-stage schedule')


class Sampler:
  """Samples latents from a model for a schedule; compiled programs are cached per instance.

  `sample(state, noise, labels, keys)` runs every segment in order; only the stage index, the
  segment flags and the array lengths are static, so each segment compiles once per Sampler.
  """

  def __init__(self, graphdef: nnx.GraphDef, schedule: stages_lib.Schedule, spec: SamplerSpec,
               num_classes: int):
    self.graphdef = graphdef
    self.schedule = schedule
    self.spec = spec
    self.null_class = num_classes
    check_guidance(schedule, spec)
    self.segments = plan(schedule, spec)
    self.steps = integration_steps(spec)
    self.trace_count = 0  # programs traced (= compiled) so far; tests count them.
    self._programs = jax.jit(self._segment_program, static_argnames=('segment',),
                             donate_argnames=('carry',))

  def _scale(self, t: float) -> float:
    return cfg_scale(self.schedule, t)

  def _velocity_fn(self, state: nnx.State, segment: Segment, y: jax.Array) -> Callable:
    """Returns v(x, t, scale): the guided velocity of `segment`'s stage (any object with `stage`
    and `guided`). x: (B, H, W, C); t: scalar or (B,)."""
    model = nnx.merge(self.graphdef, state)
    null = jnp.full_like(y, self.null_class)
    legacy = self.spec.cfg_channels == 'legacy'
    guide = guidance_stage(self.spec, segment.stage)
    if getattr(model, 'lora', False) and (guide == segment.stage or not segment.guided):
      lora.fold_into(model, segment.stage)  # one patch per program: run the merged weights

    def velocity(x, t, scale):
      tb = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
      if not segment.guided:
        return model(x, tb, y, segment.stage)
      if guide == segment.stage:
        # Sample i's two passes are rows 2i, 2i + 1: a batch-sharded x stays on its devices
        # (concatenating [x, x] would move half of every pass across the mesh).
        both = model(_pairs(x, x), _pairs(tb, tb), _pairs(y, null), segment.stage)
        both = both.reshape((x.shape[0], 2) + both.shape[1:])
        cond, uncond = both[:, 0], both[:, 1]
      else:  # the "unconditional" slot holds the weak patch's conditional prediction
        cond, uncond = packing.bucketed_forward(model, [x, x], [tb, tb], [y, y],
                                                self.spec.pack_guidance, (segment.stage, guide))
      guided = uncond + scale * (cond - uncond)
      if legacy:
        guided = jnp.concatenate([guided[..., :LEGACY_GUIDED_CHANNELS],
                                  cond[..., LEGACY_GUIDED_CHANNELS:]], axis=-1)
      return guided
    return velocity

  def _segment_program(self, state, carry, y, keys, arrays, *, segment: Segment):
    """carry: dict(x (B,H,W,C), and Heun's pending x, v, x_pred); arrays: per-step t/dt/scales."""
    self.trace_count += 1
    velocity = self._velocity_fn(state, segment, y)
    method = self.spec.method
    x = carry['x']
    if segment.finish_pending:
      p = arrays['pending']
      v2 = velocity(carry['x_pred'], p['t_next'], p['scale_next'])
      x = carry['x'] + 0.5 * p['dt'] * (carry['v'] + v2)

    def step(k, x):
      t, dt = arrays['t'][k], arrays['dt'][k]
      v = velocity(x, t, arrays['scale'][k])
      if method == 'heun':
        v2 = velocity(x + dt * v, t + dt, arrays['scale_next'][k])
        return x + 0.5 * dt * (v + v2)
      if method == 'euler':
        return x + dt * v
      return self._sde_step(x, v, t, dt, arrays['noise'][k], arrays['step'][k], keys)

    if segment.stop > segment.start:  # a narrow stage may hold only a split Heun step
      x = jax.lax.fori_loop(0, segment.stop - segment.start, step, x)
    out = dict(x=x, x_pred=x, v=jnp.zeros_like(x))
    if segment.begin_crossing:
      c = arrays['crossing']
      v = velocity(x, c['t'], c['scale'])
      out = dict(x=x, v=v, x_pred=x + c['dt'] * v)
    return out

  def _sde_step(self, x, v, t, dt, noise_flag, step_index, keys):
    """SiT Euler-Maruyama: drift v + D * score, D = norm (1 - t), score = (t v - x) / (1 - t)."""
    norm = self.spec.sde_diffusion_norm
    drift = v + norm * (t * v - x)
    mean = x + drift * dt
    diffusion = norm * (1.0 - t)
    eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step_index), x.shape[1:]))(keys)
    return mean + noise_flag * jnp.sqrt(2.0 * diffusion * dt) * eps

  def _segment_arrays(self, seg: Segment) -> dict:
    """Host (numpy) arrays: jit moves them to the program's devices, whatever they are."""
    st, f32 = self.steps, (lambda a: np.asarray(a, np.float32))
    idx = np.arange(seg.start, seg.stop)
    t, dt = st.t[idx], st.dt[idx]
    arrays = dict(t=f32(t), dt=f32(dt), noise=f32(st.noise[idx]), step=idx.astype(np.int32),
                  scale=f32([self._scale(v) for v in t]),
                  scale_next=f32([self._scale(v) for v in t + dt]))
    if seg.finish_pending:
      k = seg.start - 1
      arrays['pending'] = dict(t_next=f32(st.t[k] + st.dt[k]), dt=f32(st.dt[k]),
                               scale_next=f32(self._scale(st.t[k] + st.dt[k])))
    if seg.begin_crossing:
      k = seg.stop
      arrays['crossing'] = dict(t=f32(st.t[k]), dt=f32(st.dt[k]), scale=f32(self._scale(st.t[k])))
    return arrays

  def lower(self, state, noise, labels, keys, segment: Segment,
            array_sharding: jax.sharding.Sharding) -> jax.stages.Lowered:
    """`segment`'s program lowered for (abstract, sharded) arguments, for ahead-of-time compiles
    (aot.py); the per-step time/scale arrays get `array_sharding`. Shapes as in `sample`."""
    carry = dict(x=noise, x_pred=noise, v=noise)
    arrays = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=array_sharding),
                          self._segment_arrays(segment))
    return self._programs.lower(state, carry, labels, keys, arrays, segment=segment)

  def sample(self, state: nnx.State, noise: jax.Array, labels: jax.Array,
             keys: jax.Array | None = None, on_segment: Callable | None = None) -> jax.Array:
    """noise: (B, H, W, C) x at t = 0; labels: (B,) int; keys: (B,) per-sample PRNG keys for SDE
    noise (sample i's path depends only on its own key) -> samples (B, H, W, C) at t = 1.

    `on_segment(segment, x)` is called after each segment (benchmarks time stages with it).
    """
    if keys is None:
      keys = jax.random.split(jax.random.key(0), noise.shape[0])
    carry = dict(x=jnp.array(noise, jnp.float32), x_pred=jnp.zeros_like(noise, jnp.float32),
                 v=jnp.zeros_like(noise, jnp.float32))
    for seg in self.segments:
      carry = self._programs(state, carry, labels, keys, self._segment_arrays(seg), segment=seg)
      if on_segment is not None:
        on_segment(seg, carry['x'])
    return carry['x']


def _pairs(a: jax.Array, b: jax.Array) -> jax.Array:
  """(B, ...), (B, ...) -> (2B, ...) interleaved: a[0], b[0], a[1], b[1], ..."""
  return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall time of one sampling call and its share per (stage, guided) segment group."""
  seconds: float
  groups: dict  # {(stage, guided): seconds}

  def per_stage(self, num_stages: int) -> list[float]:
    """Seconds per model stage (guided and unguided segments together)."""
    out = [0.0] * num_stages
    for (stage, _), sec in self.groups.items():
      out[stage] += sec
    return out


def timed_sample(sampler: Sampler, state: nnx.State, noise: jax.Array, labels: jax.Array,
                 keys: jax.Array | None = None) -> tuple[jax.Array, Timing]:
  """`sampler.sample`, waiting for every segment to finish -> (samples, its Timing).

  Group seconds divided by `evaluations_by_group` give milliseconds per evaluation of each patch
  with and without the guidance pass (what explains a speed-up that differs from FLOPs).
  """
  groups: dict[tuple[int, bool], float] = {}
  last = start = time.perf_counter()

  def on_segment(seg: Segment, x: jax.Array) -> None:
    nonlocal last
    jax.block_until_ready(x)
    now = time.perf_counter()
    groups[seg.stage, seg.guided] = groups.get((seg.stage, seg.guided), 0.0) + now - last
    last = now
  x = jax.block_until_ready(sampler.sample(state, noise, labels, keys, on_segment=on_segment))
  return x, Timing(time.perf_counter() - start, groups)


def evaluations_by_group(schedule: stages_lib.Schedule, spec: SamplerSpec) -> dict:
  """{(stage, guided): model evaluations} of one run, grouped as `timed_sample` times them."""
  counts: dict[tuple[int, bool], int] = {}
  for e in evaluations(schedule, spec):
    key = (e.stage, e.guide_stage is not None)
    counts[key] = counts.get(key, 0) + 1
  return counts


# -- running a sampler ----------------------------------------------------------------------------


def index_noise(shape: tuple[int, int, int], indices: jax.Array,
                seed: int) -> tuple[jax.Array, jax.Array]:
  """indices: (n,) int sample indices -> noise (n, *shape) at t = 0 and SDE keys (n,).

  Sample i's values depend only on (seed, i): `fold_in(key(seed), i)` split into noise and path.
  """
  def one(i):
    k_noise, k_path = jax.random.split(jax.random.fold_in(jax.random.key(seed), i))
    return jax.random.normal(k_noise, shape), k_path
  return jax.vmap(one)(indices)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole array on every process (gathered when it is sharded over several processes)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sample_in_chunks(sampler: Sampler, params, shape: tuple[int, int, int], labels: np.ndarray,
                     seed: int, batch_size: int) -> tuple[np.ndarray, list[Timing]]:
  """Samples latents (N, *shape) for `labels` (N,) in chunks of `batch_size`, sample i with
  `index_noise(shape, i, seed)`. Returns (samples, the Timing of each chunk); the first chunk
  compiles the stage programs, so callers timing the sampler use the later ones
  (`steady_timings`)."""
  noise, keys = index_noise(shape, jnp.arange(len(labels)), seed)
  out, timings = [], []
  for i in range(0, len(labels), batch_size):
    x, timing = timed_sample(sampler, params, noise[i:i + batch_size],
                             jnp.asarray(labels[i:i + batch_size]), keys[i:i + batch_size])
    out.append(to_host(x))
    timings.append(timing)
  return np.concatenate(out), timings


def steady_timings(sampler: Sampler, params, shape: tuple[int, int, int], labels: np.ndarray,
                   batch_size: int, timings=(), repeats: int = 3) -> list[Timing]:
  """Per-batch timings without compilation: the full chunks after the first of `timings` (from
  `sample_in_chunks` over `labels`), topped up with fresh timed batches (after an untimed
  compile run if nothing ran yet) until there are `repeats`."""
  steady = list(timings[1:len(labels) // batch_size])
  first = labels[:batch_size]
  if not timings:
    sample_in_chunks(sampler, params, shape, first, 0, batch_size)
  while len(steady) < repeats:
    steady.append(sample_in_chunks(sampler, params, shape, first, 0, batch_size)[1][0])
  return steady
