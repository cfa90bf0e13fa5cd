"""Scanned and rematerialised blocks (models/block_stack.py) compute what the unrolled loop does."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ppflow_jax import sharding
from ppflow_jax.models import block_stack
from ppflow_jax.models import build_model


def _variant(config, scan: bool, remat: str = 'none'):
  c = copy.deepcopy(config)
  c.model.scan_blocks, c.model.remat = scan, remat
  return c


def _random_params(model, seed: int = 1) -> dict:
  """The model's params with every leaf drawn at random (the zero-initialised adaLN and final
  layers would otherwise hide the blocks from outputs and gradients)."""
  params = nnx.to_pure_dict(nnx.state(model))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, l.shape, l.dtype)
                                   for k, l in zip(keys, leaves)])


def _loss_and_grads(config, params, packed: bool):
  model = build_model(config, nnx.Rngs(0))
  graphdef = nnx.graphdef(model)
  x = jax.random.normal(jax.random.key(2), (4, 16, 16, 2))
  t = jnp.array([0.1, 0.3, 0.7, 0.9])
  y = jnp.array([0, 1, 4, 5])

  def loss(p):
    m = nnx.merge(graphdef, p)
    if not packed:
      return jnp.mean(m(x, t, y, 1) ** 2)
    from ppflow_jax import packing  # pylint: disable=g-import-not-at-top
    preds = packing.bucketed_forward(m, [x[:2], x[2:]], [t[:2], t[2:]], [y[:2], y[2:]], True)
    return sum(jnp.mean(p ** 2) for p in preds)
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize('scan, remat, packed', [
    (True, 'none', False), (True, 'none', True), (True, 'dots', True), (False, 'full', False)])
def test_scanned_and_remat_equal_unrolled_outputs_and_gradients(tiny, scan, remat, packed):
  config = tiny(2)
  params = _random_params(build_model(config, nnx.Rngs(0)))
  want_loss, want_grads = _loss_and_grads(config, params, packed)
  loss, grads = _loss_and_grads(_variant(config, scan, remat), block_stack.to_layout(params, scan),
                                packed)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  assert block_stack.is_stacked(grads) == scan
  for got, want in zip(jax.tree.leaves(block_stack.to_layout(grads, False)),
                       jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_scanned_init_is_the_stacked_unrolled_init(tiny):
  config = tiny(2)
  unrolled = nnx.to_pure_dict(nnx.state(build_model(config, nnx.Rngs(3))))
  scanned = nnx.to_pure_dict(nnx.state(build_model(_variant(config, True), nnx.Rngs(3))))
  assert block_stack.is_stacked(scanned) and not block_stack.is_stacked(unrolled)
  jax.tree.map(np.testing.assert_array_equal, block_stack.to_layout(unrolled, True), scanned)
  jax.tree.map(np.testing.assert_array_equal, block_stack.to_layout(scanned, False), unrolled)
  assert block_stack.to_layout(scanned, True) is scanned


def test_stacked_params_keep_their_logical_axes(tiny):
  config = _variant(tiny(2), True)
  state = nnx.state(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))))
  qkv = state['blocks']['attn']['qkv']['kernel']
  assert qkv.get_metadata('out_sharding') == ('layers', 'embed', 'heads')
  assert qkv.value.shape == (config.model.depth, 32, 96)
  assert dict(sharding.RULES)['layers'] is None


def test_bad_remat_is_one_clear_line(tiny):
  config = tiny(2)
  config.model.remat = 'some'
  from ppflow_jax import config_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"config.model.remat='some' must be one of"):
    config_lib.validate(config)
