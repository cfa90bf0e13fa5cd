"""FlexiDiT pieces: PI-resize, the T_weak scheduler and weak-model guidance (packed and not)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ppflow_jax.experiments import flexidit
from ppflow_jax import sampling
from ppflow_jax import stages as stages_lib
from ppflow_jax.models import build_model
from tests.helpers import tiny_config


def _model_params(config, seed=0):
  model = build_model(config, nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def _randomize(params, seed=1):
  """Random values everywhere (zero-initialised outputs would make every test trivial)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


def test_pi_resize_preserves_embedding_of_upsampled_patch():
  """FlexiViT: <resize(x), PI-resize(w)> = <x, w> for every 2x2 patch x resized to 4x4."""
  config = tiny_config(2, channels=3)
  _, params = _model_params(config)
  params = _randomize(params)
  new = flexidit.pi_resize_init(params, config, source=1, target=0)
  x = jax.random.normal(jax.random.key(2), (5, 2, 2, 3))
  x_up = jax.vmap(lambda p: jax.image.resize(p, (4, 4, 3), 'bilinear', antialias=False))(x)
  old_emb = x.reshape(5, -1) @ params['x_embedders'][1]['kernel'] + params['x_embedders'][1]['bias']
  new_emb = x_up.reshape(5, -1) @ new['x_embedders'][0]['kernel'] + new['x_embedders'][0]['bias']
  np.testing.assert_allclose(new_emb, old_emb, rtol=1e-4, atol=1e-5)
  # Plain reuse of the kernel pattern (e.g. tiling it) would not preserve it.
  tiled = np.repeat(np.repeat(np.asarray(params['x_embedders'][1]['kernel']).reshape(2, 2, 3, -1),
                              2, 0), 2, 1).reshape(48, -1)
  assert not np.allclose(x_up.reshape(5, -1) @ tiled, old_emb - params['x_embedders'][1]['bias'],
                         atol=1e-3)


def test_resized_deembedding_outputs_the_upsampled_patch():
  config = tiny_config(2, channels=2, learn_sigma=True)
  _, params = _model_params(config)
  params = _randomize(params)
  new = flexidit.pi_resize_init(params, config, source=1, target=0)
  h = jax.random.normal(jax.random.key(3), (4, 32))
  old = (h @ params['final_linears'][1]['kernel'] + params['final_linears'][1]['bias'])
  out = (h @ new['final_linears'][0]['kernel'] + new['final_linears'][0]['bias'])
  want = jax.vmap(lambda p: jax.image.resize(p, (4, 4, 4), 'bilinear', antialias=False))(
      old.reshape(4, 2, 2, 4))
  np.testing.assert_allclose(out.reshape(4, 4, 4, 4), want, rtol=1e-4, atol=1e-5)
  # Untouched stages keep their parameters.
  np.testing.assert_array_equal(new['x_embedders'][1]['kernel'], params['x_embedders'][1]['kernel'])


@pytest.mark.parametrize('method,weak_evals', [('euler', 3), ('heun', 5)])
def test_weak_step_boundary_gives_t_weak_weak_steps(method, weak_evals):
  config = tiny_config(2)
  config.sample.update(method=method, num_steps=11)
  flexidit.set_weak_steps(config, 3)
  spec = sampling.SamplerSpec.from_config(config)
  counts = sampling.num_evaluations(stages_lib.from_config(config), spec)
  per_step = 2 if method == 'heun' else 1
  assert counts == [weak_evals, per_step * 10 - weak_evals]
  with pytest.raises(ValueError, match='num_weak_steps'):
    flexidit.set_weak_steps(config, 10)


def _sampler(config, graphdef, **kw):
  spec = sampling.SamplerSpec.from_config(config, method='euler', num_steps=5, **kw)
  return sampling.Sampler(graphdef, stages_lib.from_config(config), spec,
                          config.model.num_classes)


def test_weak_guidance_formula_and_packing():
  """v = v_c(4x4) + s (v_c(2x2) - v_c(4x4)) on the fine stage; packed == separate passes."""
  config = tiny_config(2, cfg_scales=(2.0, 3.0))
  graphdef, params = _model_params(config)
  params = _randomize(params)
  model = nnx.merge(graphdef, params)
  x = jax.random.normal(jax.random.key(4), (3, 16, 16, 2))
  y = jnp.array([0, 3, 4])
  t, s = 0.7, 3.0
  tb = jnp.full((3,), t)
  want = model(x, tb, y, 0) + s * (model(x, tb, y, 1) - model(x, tb, y, 0))
  for pack in (True, False):
    sampler = _sampler(config, graphdef, guidance='weak_conditional', guidance_stage=0,
                       pack_guidance=pack)
    fine = [seg for seg in sampler.segments if seg.stage == 1][0]
    got = sampler._velocity_fn(params, fine, y)(x, t, s)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  standard = _sampler(config, graphdef)
  got = standard._velocity_fn(params, fine, y)(x, t, s)
  assert not np.allclose(got, want, atol=1e-3)


def test_weak_guidance_reduces_to_cfg_when_patches_are_equal():
  """Where p_cond = p_guid (the weak stage itself, or guidance by the finest stage) it is CFG."""
  config = tiny_config(2, cfg_scales=(2.0, 3.0))
  graphdef, params = _model_params(config)
  params = _randomize(params)
  noise = jax.random.normal(jax.random.key(5), (2, 16, 16, 2))
  y = jnp.array([1, 2])

  def run(**kw):
    firsts = []
    out = _sampler(config, graphdef, **kw).sample(
        params, noise, y, on_segment=lambda seg, x: firsts.append(np.asarray(x)))
    return firsts[0], np.asarray(out)

  cfg_first, cfg_out = run()
  weak_first, weak_out = run(guidance='weak_conditional', guidance_stage=0)
  np.testing.assert_allclose(weak_first, cfg_first, rtol=1e-5, atol=1e-6)  # 4x4 stage: CFG
  assert not np.allclose(weak_out, cfg_out, atol=1e-3)                    # 2x2 stage: weak
  _, same_out = run(guidance='weak_conditional', guidance_stage=1)
  np.testing.assert_allclose(same_out, cfg_out, rtol=1e-5, atol=1e-6)


def test_bad_guidance_is_rejected():
  config = tiny_config(2)
  graphdef, _ = _model_params(config)
  with pytest.raises(ValueError, match='guidance'):
    _sampler(config, graphdef, guidance='autoguidance')
  with pytest.raises(ValueError, match='guidance_stage'):
    _sampler(config, graphdef, guidance='weak_conditional', guidance_stage=2)
