"""dopri5: accuracy on an analytic piecewise field and against fine Heun on a model, the stage
boundary as an event, one program per stage, measured NFE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ppflow_jax import adaptive, config_lib, errors, flops, sampling, stages
from ppflow_jax.models import build_model
from tests.helpers import tiny_config


class PiecewiseField(nnx.Module):
  """dx/dt = -lam_k (1 + t) x on stage k's range; NaN if evaluated outside that range, so a
  step straddling a boundary (or an evaluation with the wrong stage) poisons the result."""

  def __init__(self, schedule: stages.Schedule, lams):
    self.lam = nnx.Param(jnp.asarray(lams, jnp.float32))
    self.edges = [(s.t_start, s.t_end) for s in schedule.stages]

  def __call__(self, x, t, y, stage):
    lo, hi = self.edges[stage]
    inside = (t >= lo) & (t <= hi)
    v = -self.lam[stage] * (1 + t)[:, None, None, None] * x
    return jnp.where(inside[:, None, None, None], v, jnp.nan)


def exact_piecewise(x0, schedule, lams):
  """x(1) = x0 exp(-sum_k lam_k int_{a_k}^{b_k} (1 + t) dt)."""
  expo = sum(lam * ((s.t_end - s.t_start) + 0.5 * (s.t_end**2 - s.t_start**2))
             for lam, s in zip(lams, schedule.stages))
  return np.asarray(x0) * np.exp(-expo)


def sample(model, schedule, spec, x0, num_classes=5):
  graphdef, state = nnx.split(model)
  sampler = adaptive.make_sampler(graphdef, schedule, spec, num_classes)
  return sampler.sample(state, x0, jnp.zeros(x0.shape[0], jnp.int32)), sampler, state


def test_piecewise_field_exact_and_no_step_straddles_a_boundary():
  schedule = stages.from_config(tiny_config(3))  # boundaries 0.5, 0.75; CFG 1.0, 2.0, 3.0
  lams = (0.5, 3.0, 8.0)
  x0 = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
  spec = sampling.SamplerSpec(method='dopri5', rtol=1e-6, atol=1e-8)
  x1, sampler, _ = sample(PiecewiseField(schedule, lams), schedule, spec, x0)
  assert np.all(np.isfinite(x1))  # no evaluation outside its stage's [t_start, t_end]
  np.testing.assert_allclose(x1, exact_piecewise(x0, schedule, lams), rtol=2e-5, atol=1e-7)
  assert [s['stage'] for s in sampler.last_stats] == [0, 1, 2]
  assert all(np.all(s['t'] == seg.t_end) for s, seg in zip(sampler.last_stats, sampler.segments))


def test_tolerance_controls_error_and_nfe_is_measured_per_stage():
  schedule = stages.from_config(tiny_config(2))
  lams = (1.0, 4.0)
  x0 = jax.random.normal(jax.random.key(1), (2, 4, 4, 2))
  errs, nfes = [], []
  for rtol in (1e-3, 1e-6):
    spec = sampling.SamplerSpec(method='dopri5', rtol=rtol, atol=1e-9)
    x1, sampler, _ = sample(PiecewiseField(schedule, lams), schedule, spec, x0)
    errs.append(float(np.max(np.abs(x1 - exact_piecewise(x0, schedule, lams)))))
    nfes.append(sum(sampler.measured_evaluations()))
    for s in sampler.last_stats:  # each sample: 2 evaluations to start + 6 per tried step
      np.testing.assert_array_equal(s['evaluations'], 2 + 6 * (s['accepted'] + s['rejected']))
      assert s['batch_evaluations'] == 2 + 6 * s['iterations'] >= s['evaluations'].max()
  assert errs[1] < errs[0] / 20 and errs[0] < 1e-3
  assert nfes[1] > nfes[0] > 0


def perturbed_model(config, seed: int):
  """(graphdef, state) of a tiny PPF whose zero-initialised layers got random values (a real,
  non-trivial velocity field)."""
  graphdef, state = nnx.split(build_model(config, nnx.Rngs(seed)))
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return graphdef, jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape)
                                             for a, k in zip(leaves, keys)])


def test_matches_fine_heun_on_a_model(tiny):
  """A one-stage tiny model with CFG 2.0 (a smooth field: fixed-grid Heun is second order there;
  across a stage boundary it is first order, which the piecewise test above covers exactly)."""
  config = tiny(1, cfg_scales=(2.0,))
  graphdef, state = perturbed_model(config, 3)
  schedule = stages.from_config(config)
  x0 = jax.random.normal(jax.random.key(5), (2, 16, 16, 2))
  labels = jnp.array([0, 4])
  dopri = adaptive.make_sampler(graphdef, schedule,
                                sampling.SamplerSpec(method='dopri5', rtol=1e-5, atol=1e-7), 5)
  heun = sampling.Sampler(graphdef, schedule, sampling.SamplerSpec(method='heun', num_steps=201), 5)
  x_heun, x_dopri = heun.sample(state, x0, labels), dopri.sample(state, x0, labels)
  motion = float(jnp.max(jnp.abs(x_heun - x0)))
  assert float(jnp.max(jnp.abs(x_dopri - x_heun))) < 1e-3 * motion and motion > 0.1
  assert sum(dopri.measured_evaluations()) < 400  # fewer than the 400-evaluation Heun grid


def test_one_program_per_stage_with_stage_wise_cfg(tiny):
  config = tiny(2)  # CFG 1.0 on the coarse stage (no guidance pass), 2.0 on the fine one
  graphdef, state = perturbed_model(config, 6)
  schedule = stages.from_config(config)
  x0 = jax.random.normal(jax.random.key(7), (3, 16, 16, 2))
  labels = jnp.array([0, 2, 4])
  dopri = adaptive.make_sampler(graphdef, schedule, sampling.SamplerSpec(method='dopri5'), 5)
  x1 = dopri.sample(state, x0, labels)
  # Per-sample step control: sample 1 alone follows the same path as in the batch.
  x1_alone = dopri.sample(state, x0[1:2], labels[1:2])
  np.testing.assert_allclose(x1_alone[0], x1[1], rtol=1e-5, atol=1e-5)
  assert dopri.trace_count == 2 * len(schedule)   # one program per stage and batch shape
  dopri.sample(state, x0 + 0.1, labels)
  assert dopri.trace_count == 2 * len(schedule)
  assert [seg.guided for seg in dopri.segments] == [False, True]
  assert [s['stage'] for s in dopri.last_stats] == [0, 1]


def test_fixed_grid_counts_refuse_dopri5_and_config_checks_tolerances(tiny):
  config = tiny(2)
  spec = sampling.SamplerSpec(method='dopri5')
  with pytest.raises(ValueError, match='no fixed grid.*last_stats'):
    sampling.num_evaluations(stages.from_config(config), spec)
  config.sample.method = 'dopri5'
  with pytest.raises(ValueError, match='no fixed grid'):
    flops.testing_flops_ratio(config)
  config.sample.atol = 0.0
  with pytest.raises(errors.ConfigError, match='config.sample.atol=0.0 must be > 0'):
    config_lib.validate(config)
