"""Samplers: accuracy on analytic fields, stage splitting, CFG, compile count, SDE marginals."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ppflow_jax import sampling, stages
from ppflow_jax.models import build_model
from tests.helpers import tiny_config


class LinearField(nnx.Module):
  """dx/dt = a x + t, whose solution is x(1) = (x0 + 1/a^2) e^a - 1/a - 1/a^2."""

  def __init__(self, a: float):
    self.a = nnx.Param(jnp.float32(a))

  def __call__(self, x, t, y, stage):
    return self.a * x + t[:, None, None, None]


class GaussianField(nnx.Module):
  """The exact flow-matching velocity E[x1 - x0 | x_t] for data x1 ~ N(m, s^2), noise N(0, 1)."""

  def __init__(self, m: float, s: float):
    self.m, self.s = nnx.Param(jnp.float32(m)), nnx.Param(jnp.float32(s))

  def __call__(self, x, t, y, stage):
    t = t[:, None, None, None]
    var = t**2 * self.s**2 + (1 - t)**2
    r = x - t * self.m
    return (self.m + t * self.s**2 * r / var) - (1 - t) * r / var


def run(model, schedule, spec, x0, labels=None, num_classes=5):
  graphdef, state = nnx.split(model)
  sampler = sampling.Sampler(graphdef, schedule, spec, num_classes)
  labels = jnp.zeros(x0.shape[0], jnp.int32) if labels is None else labels
  keys = jax.random.split(jax.random.key(1), x0.shape[0])
  return sampler.sample(state, x0, labels, keys), sampler


def exact_linear(x0, a):
  return (x0 + 1 / a**2) * np.exp(a) - 1 / a - 1 / a**2


@pytest.mark.parametrize('method, order', [('euler', 1), ('heun', 2)])
def test_convergence_order_on_analytic_field(method, order):
  schedule = stages.from_config(tiny_config(2))
  x0 = jnp.linspace(-1, 1, 8).reshape(2, 2, 2, 1) * jnp.ones((1, 1, 1, 2))
  errors = []
  for n in (11, 21, 41):
    x1, _ = run(LinearField(0.8), schedule, sampling.SamplerSpec(method=method, num_steps=n), x0)
    errors.append(float(jnp.max(jnp.abs(x1 - exact_linear(np.asarray(x0), 0.8)))))
  rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
  np.testing.assert_allclose(rates, order, atol=0.15)
  assert errors[-1] < (0.06 if order == 1 else 1e-3)


@pytest.mark.parametrize('num_steps', [5, 7, 10, 20, 250])
@pytest.mark.parametrize('num_stages', [2, 3])
def test_stage_split_heun_equals_single_program_heun(num_steps, num_stages):
  """Splitting Heun steps at stage boundaries must not change the integration."""
  multi = stages.from_config(tiny_config(num_stages))
  f = multi.finest
  single = stages.Schedule((stages.Stage(0, 0.0, 1.0, f.patch, f.cfg_scale),), multi.latent_hw)
  spec = sampling.SamplerSpec(method='heun', num_steps=num_steps)
  x0 = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
  a, sampler = run(LinearField(-0.6), multi, spec, x0)
  b, _ = run(LinearField(-0.6), single, spec, x0)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  counts = sampling.num_evaluations(multi, spec)
  assert sum(counts) == 2 * (num_steps - 1)
  assert sum(s.finish_pending for s in sampler.segments) == sum(
      s.begin_crossing for s in sampler.segments)


def test_boundary_evaluations_use_coarser_stage():
  """Grid point t = 0.5 (an even grid) is evaluated with the coarse stage."""
  schedule = stages.from_config(tiny_config(2))
  spec = sampling.SamplerSpec(method='euler', num_steps=11)  # t = 0, 0.1, ..., 1
  segs = sampling.plan(schedule, spec)
  assert [(s.stage, s.start, s.stop) for s in segs] == [(0, 0, 6), (1, 6, 10)]


@pytest.mark.parametrize('num_stages', [1, 2, 3])
def test_one_compiled_program_per_stage(num_stages):
  config = tiny_config(num_stages)
  model = build_model(config, nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  schedule = stages.from_config(config)
  sampler = sampling.Sampler(graphdef, schedule, sampling.SamplerSpec(num_steps=30), 5)
  x0 = jax.random.normal(jax.random.key(0), (2, 16, 16, 2))
  y = jnp.array([1, 2])
  jax.block_until_ready(sampler.sample(state, x0, y))
  assert sampler.trace_count == num_stages
  jax.block_until_ready(sampler.sample(state, x0 + 1, y))  # same shapes: no new programs
  assert sampler.trace_count == num_stages
  assert sampler._programs._cache_size() == num_stages  # pylint: disable=protected-access


class LabelField(nnx.Module):
  """v = (label + 1) * ones, so guidance arithmetic is visible; null label gives 0 velocity."""

  def __init__(self, null: int):
    self.null = null
    self.dummy = nnx.Param(jnp.zeros(()))

  def __call__(self, x, t, y, stage):
    v = jnp.where(y == self.null, 0.0, y + 1.0).astype(jnp.float32)
    return jnp.broadcast_to(v[:, None, None, None], x.shape) + self.dummy


@pytest.mark.parametrize('channels, expected', [('all', [6.0] * 4), ('legacy', [6.0] * 3 + [2.0])])
def test_cfg_scale_and_channels(channels, expected):
  """Euler over [0, 1] with constant guided velocity: uncond 0 + s (cond 2 - 0), s = 3."""
  schedule = stages.from_config(tiny_config(1, cfg_scales=(3.0,), channels=4))
  spec = sampling.SamplerSpec(method='euler', num_steps=5, cfg_channels=channels)
  x1, _ = run(LabelField(5), schedule, spec, jnp.zeros((1, 2, 2, 4)), jnp.array([1]))
  np.testing.assert_allclose(x1[0, 0, 0], expected, rtol=1e-6)


def test_stagewise_cfg_and_unit_scale_skip():
  """Stage 0 (scale 1.0, no uncond pass) then stage 1 (scale 2.0): x(1) = 0.5 * 2 + 0.5 * 4."""
  schedule = stages.from_config(tiny_config(2, cfg_scales=(1.0, 2.0)))
  spec = sampling.SamplerSpec(method='euler', num_steps=11)
  x1, sampler = run(LabelField(5), schedule, spec, jnp.zeros((1, 16, 16, 2)), jnp.array([1]))
  assert [s.guided for s in sampler.segments] == [False, True]
  np.testing.assert_allclose(x1[0, 0, 0], [0.6 * 2 + 0.4 * 4] * 2, rtol=1e-5)


@pytest.mark.parametrize('method', ['heun', 'sde'])
def test_gaussian_target_marginals(method):
  """With the exact velocity of a Gaussian target, ODE and SDE samples have its mean and std."""
  schedule = stages.from_config(tiny_config(2))
  spec = sampling.SamplerSpec(method=method, num_steps=101)
  x0 = jax.random.normal(jax.random.key(3), (4096, 1, 1, 1))
  x1, _ = run(GaussianField(1.5, 0.5), schedule, spec, x0)
  assert abs(float(x1.mean()) - 1.5) < 0.03
  assert abs(float(x1.std()) - 0.5) < 0.03


def test_sde_grid_and_last_step():
  spec = sampling.SamplerSpec(method='sde', num_steps=250)
  steps = sampling.integration_steps(spec)
  assert len(steps.t) == 250 and steps.t[-1] == pytest.approx(0.96)
  assert steps.dt[-1] == pytest.approx(0.04) and steps.noise[-1] == 0 and steps.noise[:-1].all()
  assert float(np.sum(steps.dt)) == pytest.approx(1.0)


def test_sde_paths_depend_only_on_own_key():
  schedule = stages.from_config(tiny_config(2))
  spec = sampling.SamplerSpec(method='sde', num_steps=20)
  graphdef, state = nnx.split(GaussianField(0.0, 1.0))
  sampler = sampling.Sampler(graphdef, schedule, spec, 5)
  x0 = jax.random.normal(jax.random.key(0), (4, 1, 1, 1))
  keys = jax.random.split(jax.random.key(7), 4)
  full = sampler.sample(state, x0, jnp.zeros(4, jnp.int32), keys)
  part = sampler.sample(state, x0[2:], jnp.zeros(2, jnp.int32), keys[2:])
  np.testing.assert_allclose(full[2:], part, rtol=1e-6)


def test_force_finest_uses_last_stage_only():
  schedule = stages.from_config(tiny_config(3))
  spec = dataclasses.replace(sampling.SamplerSpec(num_steps=20), force_finest=True)
  assert {s.stage for s in sampling.plan(schedule, spec)} == {2}
  assert sampling.num_evaluations(schedule, spec) == [0, 0, 38]


def test_inference_generates_per_index_samples_in_any_batch_size():
  """Inference.generate: sample i depends only on (seed, i), not on config.sample.batch_size."""
  from ppflow_jax import inference  # pylint: disable=g-import-not-at-top
  c = tiny_config(2)
  c.sample.update(method='euler', num_steps=4, batch_size=2)
  params = nnx.to_pure_dict(nnx.state(build_model(c, nnx.Rngs(0))))
  rng = np.random.default_rng(0)  # the zero-initialised output layers would predict v = 0
  params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype), params)
  labels = np.array([0, 1, 2, 3], np.int32)
  model = inference.Inference.from_params(c, params)
  a = model.generate(labels, seed=3)
  c.sample.batch_size = 4
  b = inference.Inference.from_params(c, params).generate(labels, seed=3)
  assert a.shape == (4, 16, 16, 2) and model.step == 0
  np.testing.assert_allclose(a, b, atol=1e-5)
  assert not np.allclose(a[0], a[1])  # different indices, different samples
  finest = model.generate(labels, seed=3, force_finest=True)
  assert not np.allclose(a, finest)  # the override reached the sampler
class RecordingStageField(nnx.Module):
  """v = -a_stage x + t + c_stage (y + 1) for labels, t only for the null label; records every call.

  The stage changes the field and the label separates the conditional from the unconditional
  pass, so the inputs of each call reveal which stage and CFG scale the previous one used.
  """
  A, C = (0.3, 0.9, 1.7), (1.0, 2.0, 3.0)

  def __init__(self, null: int):
    self.null = null
    self.calls = []  # (stage, t (B,), y (B,), x (B, ...)) per model call, in call order
    self.dummy = nnx.Param(jnp.zeros(()))

  def __call__(self, x, t, y, stage):
    jax.debug.callback(lambda *a: self.calls.append((stage,) + tuple(map(np.asarray, a))),
                       t, y, x, ordered=True)
    cond = jnp.where(y == self.null, 0.0, self.C[stage] * (y + 1.0))
    return (-self.A[stage] * x + (t + cond)[:, None, None, None]) + self.dummy

  @classmethod
  def velocity(cls, x, t, y, stage):
    return -cls.A[stage] * x + t + cls.C[stage] * (y + 1.0)


def reference_trace(boundaries, scales, method, num_steps, y, x0, finest_only):
  """The evaluations the official rules prescribe, integrated in float64 on the host.

  Stage of t: the number of boundaries strictly below t (a boundary time is coarser); the scale
  follows t's stage also when the finest patch is forced; scale 1.0 runs no unconditional pass.
  Returns [(stage, t, scale, x)] per evaluation and x(1).
  """
  grid = np.linspace(0.0, 1.0, num_steps)
  stage_of = lambda t: sum(t > b for b in boundaries)
  trace, x = [], np.asarray(x0, np.float64)

  def v(x, t):
    s = scales[stage_of(t)]
    stage = len(scales) - 1 if finest_only else stage_of(t)
    trace.append((stage, t, s, x))
    cond = RecordingStageField.velocity(x, t, y, stage)
    uncond = -RecordingStageField.A[stage] * x + t
    return uncond + s * (cond - uncond)

  for t, t_next in zip(grid[:-1], grid[1:]):
    dt = t_next - t
    v1 = v(x, t)
    x = x + dt * v1 if method == 'euler' else x + 0.5 * dt * (v1 + v(x + dt * v1, t_next))
  return trace, x


@pytest.mark.parametrize('finest_only', [False, True])
@pytest.mark.parametrize('method', ['euler', 'heun'])
@pytest.mark.parametrize('num_stages, num_steps', [
    (2, 11),   # boundary 0.5 on a grid point: predictor and corrector at t = 0.5 are coarse
    (2, 8),    # boundary inside a Heun step: the step is split across two programs
    (3, 21),   # 0.5 and 0.75 both on grid points
    (3, 10),   # neither on a grid point
    (3, 5),    # 0.5 and 0.75 on grid points of a coarse grid: a stage holds one step
])
def test_every_evaluation_uses_its_stage_and_scale(num_stages, num_steps, method, finest_only):
  """Replays each model call against the official rules: stage, time, passes and input x."""
  scales = (1.0, 2.5, 4.0)[:num_stages]
  config = tiny_config(num_stages, hw=4, cfg_scales=scales)
  schedule = stages.from_config(config)
  spec = sampling.SamplerSpec(method=method, num_steps=num_steps, force_finest=finest_only)
  null, y = 5, np.array([1, 3])
  x0 = np.asarray(jax.random.normal(jax.random.key(0), (2, 4, 4, 2)))
  model = RecordingStageField(null)
  graphdef, state = nnx.split(model)
  sampler = sampling.Sampler(graphdef, schedule, spec, null)
  x1 = sampler.sample(state, jnp.asarray(x0), jnp.asarray(y))
  jax.effects_barrier()
  expected, ref_x1 = reference_trace(schedule.boundaries, scales, method, num_steps,
                                     y[:, None, None, None], x0, finest_only)
  assert len(model.calls) == len(expected)
  for k, ((stage, t, labels, x), (e_stage, e_t, e_scale, e_x)) in enumerate(
      zip(model.calls, expected)):
    where = f'evaluation {k} at t = {e_t:.4f}'
    assert stage == e_stage, where
    np.testing.assert_allclose(t, e_t, atol=1e-6, err_msg=where)
    guided = e_scale != 1.0
    # A guided call runs each sample's two passes as rows 2i (label) and 2i + 1 (null).
    expected_labels = np.stack([y, [null] * 2], axis=1).reshape(-1) if guided else y
    np.testing.assert_array_equal(labels, expected_labels, where)
    # x carries every earlier scale: a wrong scale at evaluation k shows in evaluation k + 1.
    np.testing.assert_allclose(x[::2] if guided else x, e_x, rtol=1e-4, atol=1e-4, err_msg=where)
  np.testing.assert_allclose(x1, ref_x1, rtol=1e-4, atol=1e-4)
  # The shared count sees the same evaluations.
  listed = sampling.evaluations(schedule, spec)
  assert [(e.stage, e.cfg_scale) for e in listed] == [(s, c) for s, _, c, _ in expected]
  passes = sum(1 + (c != 1.0) for _, _, c, _ in expected)
  assert sum(sampling.forward_passes(schedule, spec)) == passes
