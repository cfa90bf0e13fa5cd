"""Adaptive Dormand-Prince 5(4) sampling (`sample.method='dopri5'`), one compiled program per stage.

SiT's ODE sampler is torchdiffeq's dopri5 (atol 1e-6, rtol 1e-3). Here each stage's time range
[t_start, t_end] is integrated by its own jitted `lax.while_loop`: the stage switch is an event,
so no step straddles a boundary (a step is clipped to end exactly on it) and the velocity field
inside a program is that of one patch size. A stage starts from its left edge with its own
patch (the right limit of the piecewise field; the fixed-grid samplers give the boundary time
itself to the coarser stage, which is the same ODE).

Error control follows torchdiffeq: RMS norm of err / (atol + rtol max(|x|, |x_new|)), step
factor clip(0.9 ratio^(-1/5), 0.2, 10) (no shrinking after an accepted step), Hairer's initial
step at the start of every stage (one extra evaluation). Unlike torchdiffeq, which shares one
step size over the batch, every sample has its own time and step size (t: (B,)), so sample i's
path depends only on its own noise, as with the fixed-grid samplers. Shapes stay static: a
sample that has reached t_end is frozen while the others finish, and still rides along in the
batched forward passes.

The evaluation count is data-dependent, so nothing predicts it (`sampling.evaluations` refuses
dopri5); every `sample` call records what it measured in `last_stats`, per stage: the batched
forward evaluations the program ran (the compute) and each sample's own evaluations, accepted
and rejected steps.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppflow_jax import sampling
from ppflow_jax import stages as stages_lib

MAX_STEPS_PER_STAGE = 10_000   # while_loop bound; reaching it is reported as an error
SAFETY, MIN_FACTOR, MAX_FACTOR, ORDER = 0.9, 0.2, 10.0, 5  # torchdiffeq's controller

# Dormand-Prince 5(4) tableau as 7 evaluations: row i of A gives the point of evaluation i from
# evaluations 0..i-1 (its last row is the 5th-order solution, so evaluation 6 is f at the new
# point, reused as the next step's first: FSAL); ERR = b - b* weighs the error estimate.
C = np.array([0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1])
A = np.zeros((7, 7))
A[1, :1] = [1 / 5]
A[2, :2] = [3 / 40, 9 / 40]
A[3, :3] = [44 / 45, -56 / 15, 32 / 9]
A[4, :4] = [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729]
A[5, :5] = [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]
A[6, :6] = [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]
ERR = np.array([71 / 57600, 0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40])


@dataclasses.dataclass(frozen=True)
class Interval:
  """One stage's time range, run by one program (static): the model stage, its CFG scale."""
  stage: int
  t_start: float
  t_end: float
  cfg_scale: float
  guided: bool   # runs the guidance pass (its scale is not a skipped 1.0)


def intervals(schedule: stages_lib.Schedule, spec: sampling.SamplerSpec) -> list[Interval]:
  """The schedule's stages as integration intervals (all at the finest patch with force_finest,
  still split where the CFG scale changes, like the fixed-grid segments)."""
  out = []
  for s in schedule.stages:
    stage = len(schedule) - 1 if spec.force_finest else s.index
    guided = not (spec.skip_unit_cfg and s.cfg_scale == 1.0)
    out.append(Interval(stage, s.t_start, s.t_end, s.cfg_scale, guided))
  return out


def _rms(x: jax.Array) -> jax.Array:
  """(B, ...) -> (B,) root mean square over each sample."""
  return jnp.sqrt(jnp.mean(jnp.square(x), axis=tuple(range(1, x.ndim))))


def _per_sample(v: jax.Array, x: jax.Array) -> jax.Array:
  """(B,) -> broadcastable against x (B, H, W, C)."""
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def initial_step(f: Callable, x: jax.Array, t: jax.Array, f0: jax.Array, span: float,
                 atol: float, rtol: float) -> jax.Array:
  """Hairer, Norsett & Wanner's starting step (torchdiffeq's), per sample; one evaluation.

  x, f0: (B, H, W, C) state and f(x, t); t: (B,) -> (B,) step sizes <= span.
  """
  scale = atol + rtol * jnp.abs(x)
  d0, d1 = _rms(x / scale), _rms(f0 / scale)
  h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.maximum(d1, 1e-30))
  h0 = jnp.minimum(h0, span)
  f1 = f(x + _per_sample(h0, x) * f0, t + h0)
  d2 = _rms((f1 - f0) / scale) / h0
  big = jnp.maximum(d1, d2)
  h1 = jnp.where(big <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3),
                 (0.01 / jnp.maximum(big, 1e-30)) ** (1.0 / ORDER))
  return jnp.minimum(jnp.minimum(100 * h0, h1), span)


def dopri5_step(f: Callable, x: jax.Array, t: jax.Array, h: jax.Array,
                k1: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One Dormand-Prince step of size h (B,) from (x, t) with k1 = f(x, t).

  Returns (x_new, f(x_new, t + h), error estimate), each (B, H, W, C); six evaluations, run by a
  loop so the program traces the model once.
  """
  hb = _per_sample(h, x)
  a, c = jnp.asarray(A, jnp.float32), jnp.asarray(C, jnp.float32)

  def evaluation(i, ks):
    point = x + hb * jnp.tensordot(a[i], ks, axes=1)
    return ks.at[i].set(f(point, t + c[i] * h))
  ks = jnp.zeros((7,) + x.shape, x.dtype).at[0].set(k1)
  ks = jax.lax.fori_loop(1, 7, evaluation, ks)
  x_new = x + hb * jnp.tensordot(a[6], ks, axes=1)
  return x_new, ks[6], hb * jnp.tensordot(jnp.asarray(ERR, jnp.float32), ks, axes=1)


def step_factor(ratio: jax.Array, accepted: jax.Array) -> jax.Array:
  """torchdiffeq's step-size factor from the error ratio (B,): never shrinks an accepted step."""
  factor = SAFETY / jnp.maximum(ratio, 1e-10) ** (1.0 / ORDER)
  factor = jnp.clip(factor, jnp.where(accepted, 1.0, MIN_FACTOR), MAX_FACTOR)
  return jnp.where(ratio == 0, MAX_FACTOR, factor)


def integrate(f: Callable, x: jax.Array, t_start: float, t_end: float, atol: float,
              rtol: float, max_steps: int = MAX_STEPS_PER_STAGE) -> tuple[jax.Array, dict]:
  """Integrates dx/dt = f(x, t) over [t_start, t_end] per sample, inside one program.

  f: (x (B, H, W, C), t (B,)) -> (B, H, W, C). Returns (x at t_end, stats): 'iterations' (loop
  trips; the batch ran 2 + 6 * iterations evaluations), per sample (B,) 'evaluations',
  'accepted', 'rejected' and 't' (t_end unless max_steps ran out).
  """
  n = x.shape[0]
  t0 = jnp.full((n,), t_start, jnp.float32)
  k1 = f(x, t0)
  h = initial_step(f, x, t0, k1, t_end - t_start, atol, rtol)
  zeros = jnp.zeros((n,), jnp.int32)
  init = dict(x=x, t=t0, k1=k1, h=h, evaluations=zeros + 2, accepted=zeros, rejected=zeros,
              iterations=jnp.int32(0))

  def running(c):
    return jnp.any(c['t'] < t_end) & (c['iterations'] < max_steps)

  def body(c):
    active = c['t'] < t_end
    h = jnp.minimum(c['h'], t_end - c['t'])  # the boundary is an event: never step across it
    x_new, k_new, err = dopri5_step(f, c['x'], c['t'], h, c['k1'])
    tol = atol + rtol * jnp.maximum(jnp.abs(c['x']), jnp.abs(x_new))
    ratio = _rms(err / tol)
    ok = active & (ratio <= 1.0)
    lands = h >= t_end - c['t']
    keep = _per_sample(ok, x)
    return dict(
        x=jnp.where(keep, x_new, c['x']), k1=jnp.where(keep, k_new, c['k1']),
        t=jnp.where(ok, jnp.where(lands, t_end, c['t'] + h), c['t']),
        h=jnp.where(active, h * step_factor(ratio, ok), c['h']),
        evaluations=c['evaluations'] + 6 * active, accepted=c['accepted'] + ok,
        rejected=c['rejected'] + (active & ~ok), iterations=c['iterations'] + 1)

  out = jax.lax.while_loop(running, body, init)
  stats = {k: out[k] for k in ('iterations', 'evaluations', 'accepted', 'rejected', 't')}
  return out['x'], stats


class AdaptiveSampler(sampling.Sampler):
  """dopri5 over the schedule's stages; `sample` and `on_segment` as `sampling.Sampler`'s.

  One program per interval (compiled once per instance, `trace_count` counts traces); after each
  `sample` call `last_stats` holds, per interval, numpy stats of `integrate` plus 'stage' and
  'batch_evaluations' (forward evaluations the program ran for the whole batch).
  """

  def __init__(self, graphdef: nnx.GraphDef, schedule: stages_lib.Schedule,
               spec: sampling.SamplerSpec, num_classes: int):
    # pylint: disable=super-init-not-called  (the fixed-grid plan does not apply)
    if spec.method != sampling.ADAPTIVE:
      raise ValueError(f'AdaptiveSampler runs method {sampling.ADAPTIVE!r}, got {spec.method!r}')
    sampling.check_guidance(schedule, spec)
    self.graphdef, self.schedule, self.spec, self.null_class = graphdef, schedule, spec, num_classes
    self.segments = intervals(schedule, spec)
    self.trace_count = 0
    self.last_stats: list[dict] = []
    self._programs = jax.jit(self._interval_program, static_argnames=('segment',))

  def _interval_program(self, state, x, y, *, segment: Interval):
    """x: (B, H, W, C) at segment.t_start -> (x at t_end, stats)."""
    self.trace_count += 1
    velocity = self._velocity_fn(state, segment, y)
    return integrate(lambda x, t: velocity(x, t, segment.cfg_scale), x, segment.t_start,
                     segment.t_end, self.spec.atol, self.spec.rtol)

  def sample(self, state: nnx.State, noise: jax.Array, labels: jax.Array,
             keys: jax.Array | None = None, on_segment: Callable | None = None) -> jax.Array:
    """noise: (B, H, W, C) at t = 0; labels: (B,) -> samples (B, H, W, C) at t = 1 (keys unused:
    the ODE is deterministic). Raises if a stage ran out of MAX_STEPS_PER_STAGE."""
    del keys
    x, stats = jnp.asarray(noise, jnp.float32), []
    for seg in self.segments:
      x, s = self._programs(state, x, labels, segment=seg)
      stats.append((seg, s))
      if on_segment is not None:
        on_segment(seg, x)
    self.last_stats = []
    for seg, s in stats:
      s = jax.tree.map(np.asarray, s)
      if np.any(s['t'] < seg.t_end):
        raise RuntimeError(f'dopri5 stopped at t={float(s["t"].min()):.6g} in stage {seg.stage} '
                           f'after {MAX_STEPS_PER_STAGE} steps; loosen config.sample.atol/rtol '
                           f'(now {self.spec.atol}, {self.spec.rtol})')
      self.last_stats.append(dict(s, stage=seg.stage,
                                  batch_evaluations=2 + 6 * int(s['iterations'])))
    return x

  def measured_evaluations(self) -> list[float]:
    """Mean model evaluations per sample in each interval of the last `sample` call (NFE)."""
    return [float(s['evaluations'].mean()) for s in self.last_stats]


def make_sampler(graphdef: nnx.GraphDef, schedule: stages_lib.Schedule,
                 spec: sampling.SamplerSpec, num_classes: int) -> sampling.Sampler:
  """The sampler of `spec.method`: adaptive dopri5 or the fixed-grid `sampling.Sampler`."""
  cls = AdaptiveSampler if spec.method == sampling.ADAPTIVE else sampling.Sampler
  return cls(graphdef, schedule, spec, num_classes)
