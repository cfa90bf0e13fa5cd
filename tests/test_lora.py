"""Per-patch LoRA: merged = unmerged per stage (also packed and in the sampler), a frozen base
bitwise untouched by training, checkpoint round trips, init from base params, merged export."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ppflow_jax import checkpoint, config_lib, errors, packing, sampling, sharding, stages
from ppflow_jax.models import build_model, lora
from ppflow_jax.train import Trainer
from tests.helpers import tiny_config


def lora_config(rank=2, scan=False):
  c = tiny_config(2)
  c.model.update(lora_rank=rank, scan_blocks=scan)
  c.train.final_report = False
  return config_lib.resolve(c)


def trained_adapters(config, seed=0):
  """Pure params of a LoRA model as after training: every leaf (base and adapters) random
  N(0, 0.1^2); numpy, so no per-shape kernels compile."""
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), abstract)


def without_adapters(params):
  """The base params inside LoRA params (adapters dropped)."""
  zero_b = jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.zeros_like(a) if lora.is_adapter_path(p) else a, params)
  return lora.merged_params(zero_b, 0)


def apply(config, params, x, t, y, stage):
  """The model of `config` with pure `params` at `stage` (one jitted forward)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))))

  @jax.jit
  def forward(params, x, t, y):
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)(x, t, y, stage)
  return forward(params, x, t, y)


def inputs(n=3, seed=2):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(k1, (n, 16, 16, 2)), jax.random.uniform(k2, (n,)),
          jnp.arange(n) % 5)


@pytest.mark.parametrize('scan, stage', [(False, 1), (True, 0)])
def test_merged_equals_unmerged(scan, stage):
  config = lora_config(scan=scan)
  params = trained_adapters(config)
  x, t, y = inputs()
  base = lora.base_config(config)
  merged = lora.merged_params(params, stage)
  np.testing.assert_allclose(apply(base, merged, x, t, y, stage),
                             apply(config, params, x, t, y, stage), rtol=1e-4, atol=1e-5)
  # The fold is not a no-op: every adapted kernel moved, differently per stage.
  other = lora.merged_params(params, 1 - stage)
  kernels = lambda p: [a for path, a in jax.tree_util.tree_flatten_with_path(p)[0]
                       if 'kernel' in str(path) and 'blocks' in str(path)]
  base_kernels = kernels(without_adapters(params))
  moved = [float(jnp.max(jnp.abs(m - b))) for m, b in zip(kernels(merged), base_kernels)]
  assert sum(m > 1e-3 for m in moved) == 4 * config.model.depth // (config.model.depth if scan else 1)
  assert any(not np.array_equal(a, b) for a, b in zip(kernels(merged), kernels(other)))


def test_packed_forward_takes_each_tokens_own_adapter():
  config = lora_config()
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, trained_adapters(config))
  x, t, y = inputs(4)
  xs, ts, ys = [x[:2], x[2:]], [t[:2] * 0.5, 0.5 + t[2:] * 0.5], [y[:2], y[2:]]

  @jax.jit
  def both(state):
    model = nnx.merge(graphdef, state)
    return (packing.bucketed_forward(model, xs, ts, ys, True),
            packing.bucketed_forward(model, xs, ts, ys, False))
  packed, separate = both(state)
  for got, want in zip(packed, separate):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_sampler_runs_folded_weights_equal_to_unmerged():
  config = lora_config()
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, trained_adapters(config))
  schedule = stages.from_config(config)
  spec = sampling.SamplerSpec(method='euler', num_steps=3)
  x0, _, y = inputs(2)
  folded = sampling.Sampler(graphdef, schedule, spec, 5).sample(state, x0, y)
  # Reference: the same Euler steps with the unmerged model (per-token adapter path).
  model, x = nnx.merge(graphdef, state), x0
  for t0, dt in ((0.0, 0.5), (0.5, 0.5)):
    stage = schedule.stage_index(t0)
    tb = jnp.full((2,), t0)
    cond, uncond = model(x, tb, y, stage), model(x, tb, jnp.full_like(y, 5), stage)
    scale = schedule.stages[stage].cfg_scale
    v = cond if scale == 1.0 else uncond + scale * (cond - uncond)
    x = x + dt * v
  np.testing.assert_allclose(folded, x, rtol=1e-4, atol=1e-4)


def test_training_updates_only_adapters_base_bitwise_untouched():
  config = lora_config()
  trainer = Trainer(config, sharding.make_mesh(config))
  state = trainer.state_from_params(trained_adapters(config))
  before = jax.device_get(state)
  batch = {'x': jax.random.normal(jax.random.key(0), (8, 16, 16, 2)),
           'y': jnp.arange(8) % 5}
  for _ in range(3):
    state, metrics = trainer.step(state, batch)
  after = jax.device_get(state)
  assert int(metrics['nonfinite']) == 0
  moved = []
  for tree in ('params', 'ema'):
    flat_b = jax.tree_util.tree_flatten_with_path(getattr(before, tree))[0]
    flat_a = jax.tree.leaves(getattr(after, tree))
    for (path, b), a in zip(flat_b, flat_a):
      if lora.is_adapter_path(path):
        moved.append(not np.array_equal(a, b))
      else:
        assert np.array_equal(a, b), path  # bitwise
  assert any(moved)
  # The optimizer keeps moments for the adapters only.
  mu_leaves = jax.tree.leaves(after.opt_state)
  n_adapter = sum(np.size(a) for p, a in jax.tree_util.tree_flatten_with_path(after.params)[0]
                  if lora.is_adapter_path(p))
  assert sum(np.size(a) for a in mu_leaves) < 3 * n_adapter + 10


def test_checkpoint_round_trip_init_from_base_and_merged_export(tmp_path):
  config = lora_config()
  mesh = sharding.make_mesh(config)
  params = trained_adapters(config)
  # LoRA params round trip in the one params format.
  checkpoint.save_params(str(tmp_path / 'lora'), params, config)
  loaded = checkpoint.load_params(str(tmp_path / 'lora'), config, mesh)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(params))
  # Init from base params: the adapters start at b = 0, so the model is exactly the base.
  base = lora.base_config(config)
  base_params = without_adapters(trained_adapters(config, seed=7))
  checkpoint.save_params(str(tmp_path / 'base'), base_params, base)
  started = checkpoint.load_init_params(str(tmp_path / 'base'), config, mesh)
  x, t, y = inputs()
  for stage in range(2):
    np.testing.assert_array_equal(apply(config, started, x, t, y, stage),
                                  apply(base, base_params, x, t, y, stage))
  # Export stage 1 merged: plain base-model params that load with the base config.
  checkpoint.save_params(str(tmp_path / 'merged'), lora.merged_params(params, 1), base)
  merged = checkpoint.load_params(str(tmp_path / 'merged'), base, mesh)
  np.testing.assert_allclose(apply(base, merged, x, t, y, 1), apply(config, params, x, t, y, 1),
                             rtol=1e-4, atol=1e-5)
  with pytest.raises(checkpoint.ConfigMismatchError, match='lora_rank'):
    checkpoint.load_params(str(tmp_path / 'merged'), config, mesh)


@pytest.mark.parametrize('field, value, message', [
    ('lora_rank', -1, 'config.model.lora_rank=-1 must be an int >= 0'),
    ('lora_targets', ('qkv', 'adaLN'), 'config.model.lora_targets=.* subset'),
])
def test_bad_lora_fields(field, value, message):
  c = tiny_config(2)
  c.model[field] = value
  if field == 'lora_targets':
    c.model.lora_rank = 2
  with pytest.raises(errors.ConfigError, match=message):
    config_lib.resolve(c)
