"""MPDiT: shapes, the paper's GFLOPs/params, the upsample layout, and training with the Trainer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ppflow_jax import config_lib
from ppflow_jax import sampling
from ppflow_jax import sharding
from ppflow_jax import train
from ppflow_jax.models import build_model
from ppflow_jax.models import mpdit
from tests.helpers import tiny_config


def tiny_mpdit(**model):
  c = tiny_config(1, hw=16, channels=2, learn_sigma=False)
  c.model.update(dict(dict(variant='mpdit', level_embedding=False, depth=3, mpdit_fine_blocks=1,
                           mpdit_class_tokens=2, class_dropout=0.0), **model))
  return config_lib.resolve(c)


@pytest.mark.parametrize('module,gflops,params_m,ablations', [
    ('mpdit_b', 16.6, 104.8, {('k', 4): 13.9, ('k', 8): 19.3, ('m', 1): 15.3, ('m', 4): 15.6,
                            ('m', 8): 15.9, ('m', 32): 18.0}),
    ('mpdit_xl', 59.3, 481.2, {('k', 4): 53.2, ('k', 8): 65.4}),
])
def test_flops_and_params_match_paper(module, gflops, params_m, ablations):
  """MPDiT Tables 2, 4, 6 (GFLOPs) and 3-4 (params, incl. the two frozen sin-cos tables)."""
  c = config_lib.resolve(config_lib.load_config(f'configs/{module}.py'))
  assert round(mpdit.mpdit_forward_flops(c) / 1e9, 1) == gflops
  assert mpdit.mpdit_forward_flops(c, 'exact') < mpdit.mpdit_forward_flops(c)
  abstract = nnx.eval_shape(lambda: build_model(c, nnx.Rngs(0)))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  d = c.model.hidden_size
  assert (n + (64 + 256) * d) / 1e6 == pytest.approx(params_m, abs=0.06)  # paper truncates
  for (field, value), want in ablations.items():
    a = config_lib.resolve(config_lib.load_config(f'configs/{module}.py'))
    a.model['mpdit_fine_blocks' if field == 'k' else 'mpdit_class_tokens'] = value
    assert round(mpdit.mpdit_forward_flops(a) / 1e9, 1) == want, (field, value)


def test_shapes_and_conditioning():
  c = tiny_mpdit()
  model = build_model(c, nnx.Rngs(0))
  # Give the zero-initialised outputs values so t and y visibly matter.
  leaves, tree = jax.tree.flatten(nnx.to_pure_dict(nnx.state(model)))
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, a.shape)
                                     for k, a in zip(keys, leaves)])
  model = nnx.merge(nnx.graphdef(model), params)
  x = jax.random.normal(jax.random.key(0), (3, 16, 16, 2))
  t, y = jnp.array([0.1, 0.5, 0.9]), jnp.array([0, 1, 5])
  v = model(x, t, y, 0)
  assert v.shape == (3, 16, 16, 2) and v.dtype == jnp.float32
  assert len(model.coarse_blocks) == 2 and len(model.fine_blocks) == 1
  assert not np.allclose(model(x, t[::-1], y, 0), v)
  assert not np.allclose(model(x, t, jnp.array([5, 5, 5]), 0), v)
  # Samples are independent (no cross-batch mixing).
  np.testing.assert_allclose(model(x[:1], t[:1], y[:1], 0), v[:1], rtol=1e-5, atol=1e-6)


def test_upsample_pixel_shuffle_layout():
  """Output token (h*2 + p, w*2 + q) takes channels [c*4 + p*2 + q] of coarse token (h, w)."""
  up = mpdit.Upsample(3, (2, 2), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  up.proj.kernel.value = jnp.zeros((3, 12)).at[0, 1].set(1.0)  # only (c=0, p=0, q=1) fires
  x = jnp.zeros((1, 1 + 4, 3)).at[0, 1 + 3, 0].set(1.0)       # coarse token (1, 1) of a 2x2 grid
  img = up.proj(x[:, 1:])
  from einops import rearrange
  fine = rearrange(img, 'b (h w) (d p q) -> b h p w q d', h=2, p=2, q=2)
  assert fine[0, 1, 0, 1, 1, 0] == 1.0  # row 1*2 + 0, col 1*2 + 1
  assert up(x, 1, (2, 2)).shape == (1, 1 + 16, 3)


def test_bad_config_is_rejected():
  c = tiny_config(2)
  c.model.variant = 'mpdit'
  with pytest.raises(ValueError, match='one schedule stage'):
    build_model(c, nnx.Rngs(0))
  with pytest.raises(ValueError, match='mpdit_fine_blocks'):
    build_model(tiny_mpdit(mpdit_fine_blocks=9), nnx.Rngs(0))
  with pytest.raises(ValueError, match='stage=1'):
    build_model(tiny_mpdit(), nnx.Rngs(0))(jnp.zeros((1, 16, 16, 2)), jnp.zeros(1),
                                           jnp.zeros(1, jnp.int32), 1)


def test_training_step_reduces_loss_and_sampler_runs():
  c = tiny_mpdit()
  c.train.update(batch_size=8, lr=2e-3, ema_decay=0.0)
  trainer = train.Trainer(c, sharding.make_mesh(c))
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  batch = {'x': jnp.asarray(np.tanh(rng.normal(size=(8, 16, 16, 2))), jnp.float32),
           'y': jnp.asarray(rng.integers(0, 5, 8), jnp.int32)}
  key = jax.random.key(7)
  first = float(trainer.loss_fn(state.params, batch, key)[0])
  for _ in range(30):
    state, metrics = trainer.step(state, batch)
    assert int(metrics['nonfinite']) == 0
  assert float(trainer.loss_fn(state.params, batch, key)[0]) < 0.8 * first
  spec = sampling.SamplerSpec.from_config(c, method='euler', num_steps=4)
  out = sampling.Sampler(trainer.graphdef, trainer.schedule, spec, 5).sample(
      state.ema, jnp.zeros((2, 16, 16, 2)), jnp.array([0, 1]))
  assert out.shape == (2, 16, 16, 2) and np.all(np.isfinite(np.asarray(out)))
