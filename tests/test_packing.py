"""Patch n' Pack: the static plan and its layout, packed == unpacked forward and gradients, no
leakage between packed samples or from padding, patchify round trips, and one stage == SiT."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ppflow_jax import config_lib
from ppflow_jax import packing
from ppflow_jax import sharding
from ppflow_jax import stages as stages_lib
from ppflow_jax import train
from ppflow_jax.models import build_model
from ppflow_jax.models import dit
from ppflow_jax.models import ppf
from tests.helpers import tiny_config

TOL = dict(rtol=1e-5, atol=1e-5)


# -- the plan -------------------------------------------------------------------------------------

def test_plan_layout_with_partial_row_and_row_multiple():
  # 3 coarse samples of 4 tokens (4 per 16-token row: one partial row) + 2 fine samples of 16,
  # rounded up to a multiple of 4 rows: 1 + 2 filled rows, 1 padding row.
  plan = packing.make_plan((3, 2), (4, 16), row_multiple=4)
  assert (plan.row_length, plan.num_rows) == (16, 4)
  assert [plan.rows(s) for s in (0, 1)] == [1, 3]
  layout = plan.layout()
  expected = np.array([[1] * 4 + [2] * 4 + [3] * 4 + [0] * 4, [1] * 16, [1] * 16, [0] * 16])
  np.testing.assert_array_equal(layout.segment_ids, expected)
  assert layout.groups == ((1, 4, 4, 3), (3, 1, 16, 2))
  assert plan.padding_fraction == pytest.approx(1 - (3 * 4 + 2 * 16) / (4 * 16))
  assert packing.make_plan((3, 2), (4, 16)).num_rows == 3


def test_pack_unpack_round_trip_and_zero_padding():
  plan = packing.make_plan((5, 3, 2), (4, 8, 16), row_multiple=3)
  keys = jax.random.split(jax.random.key(0), 3)
  tokens = [jax.random.normal(k, (n, l, 3)) for k, n, l in zip(keys, plan.counts, plan.lengths)]
  packed = packing.pack(plan, tokens)
  assert packed.shape == (plan.num_rows, 16, 3) and plan.num_rows % 3 == 0
  for a, b in zip(packing.unpack(plan, packed), tokens):
    np.testing.assert_array_equal(a, b)
  seg = np.asarray(plan.layout().segment_ids)
  assert not np.any(np.asarray(packed)[seg == 0])  # padding tokens are zeros
  # The first row holds coarse samples 0..3 in order, each its own segment.
  np.testing.assert_array_equal(packed[0, 4:8], tokens[0][1])
  np.testing.assert_array_equal(seg[0], np.repeat([1, 2, 3, 4], 4))


def test_per_token_gives_each_token_its_own_sample_value():
  plan = packing.make_plan((5, 3, 2), (4, 8, 16), row_multiple=4)
  values = jnp.arange(10.0)[:, None] * jnp.array([[1.0, -1.0]])  # (S, 2): sample index
  out = np.asarray(dit.per_token(values, plan.layout()))
  owner = np.asarray(packing.pack(plan, [jnp.full((n, l, 1), 1.0) * jnp.arange(
      s0, s0 + n, dtype=jnp.float32)[:, None, None] for n, l, s0 in
      zip(plan.counts, plan.lengths, (0, 5, 8))]))[..., 0]
  real = np.asarray(plan.layout().segment_ids) > 0
  np.testing.assert_array_equal(out[..., 0][real], owner[real])
  np.testing.assert_array_equal(out[..., 1][real], -owner[real])
  np.testing.assert_array_equal(dit.per_token(values, None), values[:, None])


def test_paper_batches_token_savings():
  """Batch 256 on a 32x32 latent: PPF-2 needs 62.5% and PPF-3 50% of SiT's tokens, no padding."""
  for num_stages, fraction, rows in ((2, 0.625, 160), (3, 0.5, 128)):
    c = tiny_config(num_stages, hw=32)
    schedule = stages_lib.from_config(c)
    counts = schedule.bucket_sizes(256)
    lengths = tuple(schedule.num_tokens(s) for s in range(num_stages))
    plan = packing.make_plan(counts, lengths)
    assert sum(n * l for n, l in zip(counts, lengths)) == fraction * 256 * 256
    assert (plan.num_rows, plan.padding_fraction) == (rows, 0.0)


def test_plan_errors_are_clear():
  with pytest.raises(ValueError, match='must divide the finest'):
    packing.make_plan((2, 2), (24, 64))
  with pytest.raises(ValueError, match='one count per token length'):
    packing.make_plan((2,), (16, 64))
  with pytest.raises(ValueError, match='must be positive'):
    packing.make_plan((2, 2), (16, 64), row_multiple=0)


# -- packed == unpacked ---------------------------------------------------------------------------

def _randomized(config, seed: int = 0):
  """A model with every parameter random (the default init zeroes adaLN and final linears)."""
  model = build_model(config, nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  leaves, tree = jax.tree.flatten(nnx.to_pure_dict(state))
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  scale = lambda p: 1 / np.sqrt(p.shape[0]) if p.ndim == 2 else 0.1  # (in, out) kernels, tables
  leaves = [scale(p) * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  return graphdef, jax.tree.unflatten(tree, leaves)


def _buckets(config, counts, seed: int = 0):
  h, w, ch = config.latent.height, config.latent.width, config.latent.channels
  keys = jax.random.split(jax.random.key(seed), 3 * len(counts))
  xs = [jax.random.normal(keys[3 * i], (n, h, w, ch)) for i, n in enumerate(counts)]
  ts = [jax.random.uniform(keys[3 * i + 1], (n,)) for i, n in enumerate(counts)]
  ys = [jax.random.randint(keys[3 * i + 2], (n,), 0, config.model.num_classes + 1)
        for i, n in enumerate(counts)]
  return xs, ts, ys


def _forward(graphdef, params, xs, ts, ys, packed, row_multiple=1):
  fn = lambda p, xs, ts, ys: packing.bucketed_forward(nnx.merge(graphdef, p), xs, ts, ys, packed,
                                                      row_multiple=row_multiple)
  return jax.jit(fn)(params, xs, ts, ys)


@pytest.mark.parametrize('num_stages,counts', [(2, (3, 2)), (3, (5, 3, 2))])
def test_packed_forward_equals_unpacked(num_stages, counts):
  config = tiny_config(num_stages)
  graphdef, params = _randomized(config)
  xs, ts, ys = _buckets(config, counts)
  unpacked = _forward(graphdef, params, xs, ts, ys, False)
  for row_multiple in (1, 4):
    packed = _forward(graphdef, params, xs, ts, ys, True, row_multiple)
    for a, b in zip(packed, unpacked):
      np.testing.assert_allclose(a, b, **TOL)
  # Meaningful: the (random, non-zero) conditioning changes every sample's output.
  other_t = _forward(graphdef, params, xs, [1.0 - t for t in ts], ys, False)
  for a, b in zip(other_t, unpacked):
    assert float(jnp.min(jnp.max(jnp.abs(a - b), axis=(1, 2, 3)))) > 1e-2


def _trainer(config, packing_on: bool) -> train.Trainer:
  config = config.copy_and_resolve_references()
  config.train.packing = packing_on
  return train.Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))


@pytest.mark.parametrize('num_stages,batch', [(2, 6), (3, 10)])
def test_packed_loss_and_gradients_equal_unpacked(num_stages, batch):
  config = tiny_config(num_stages)
  config.train.batch_size = batch
  _, params = _randomized(config)
  rng = np.random.default_rng(0)
  data = {'x': jnp.asarray(rng.normal(size=(batch, 16, 16, 2)), jnp.float32),
          'y': jnp.asarray(rng.integers(0, 5, batch), jnp.int32)}
  out = []
  for packing_on in (True, False):
    tr = _trainer(config, packing_on)
    assert tr.bucket_sizes[0] % 4  # the coarse (16-token) samples leave a partial row
    fn = jax.jit(jax.value_and_grad(tr.loss_fn, has_aux=True))
    out.append(fn(params, data, jax.random.key(3)))
  ((loss_p, aux_p), grad_p), ((loss_u, aux_u), grad_u) = out
  np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5)
  for k in aux_u:
    np.testing.assert_allclose(aux_p[k], aux_u[k], rtol=1e-5)
  flat_p, flat_u = jax.tree.leaves(grad_p), jax.tree.leaves(grad_u)
  for gp, gu in zip(flat_p, flat_u):
    np.testing.assert_allclose(gp, gu, rtol=1e-4, atol=1e-6)
  assert min(float(jnp.max(jnp.abs(g))) for g in flat_u) > 0  # every param gets a gradient


def test_no_leakage_between_packed_samples_or_from_padding(monkeypatch):
  config = tiny_config(2)
  graphdef, params = _randomized(config)
  xs, ts, ys = _buckets(config, (3, 2))  # coarse row: samples 0, 1, 2 and a padding segment
  base = _forward(graphdef, params, xs, ts, ys, True, row_multiple=4)
  changed = [xs[0].at[0].set(10.0 * xs[0][0] + 1.0), xs[1]]
  out = _forward(graphdef, params, changed, ts, ys, True, row_multiple=4)
  assert float(jnp.max(jnp.abs(out[0][0] - base[0][0]))) > 1e-2  # the changed sample changes
  np.testing.assert_array_equal(out[0][1:], base[0][1:])          # its row mates do not
  np.testing.assert_array_equal(out[1], base[1])

  # Padding tokens contribute nothing: poisoning them leaves every output unchanged.
  pack = packing.pack

  def poisoned(plan, tokens):
    x = pack(plan, tokens)
    pad = (plan.layout().segment_ids == 0)[..., None]
    return jnp.where(pad, 1e3 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), x)

  monkeypatch.setattr(packing, 'pack', poisoned)
  out = _forward(graphdef, params, xs, ts, ys, True, row_multiple=4)
  for a, b in zip(out, base):
    np.testing.assert_allclose(a, b, **TOL)


# -- patchify and the one-stage model -------------------------------------------------------------

@pytest.mark.parametrize('patch', [(1, 1), (1, 2), (2, 2), (2, 4), (4, 2), (4, 4), (4, 8)])
def test_patchify_unpatchify_identity_and_order(patch):
  ph, pw = patch
  x = jax.random.normal(jax.random.key(0), (2, 8, 16, 3))
  tokens = ppf.patchify(x, patch)
  assert tokens.shape == (2, (8 // ph) * (16 // pw), ph * pw * 3)
  np.testing.assert_array_equal(ppf.unpatchify(tokens, patch, (8, 16)), x)
  # Tokens are row-major; each vector is (row-in-patch, col-in-patch, channel), channel innermost.
  i, j, p, q, c = 8 // ph - 1, 1 % (16 // pw), ph - 1, pw // 2, 2
  assert tokens[1, i * (16 // pw) + j, (p * pw + q) * 3 + c] == x[1, i * ph + p, j * pw + q, c]


def test_single_stage_model_is_sit_xl_2():
  config = config_lib.resolve(config_lib.load_config('configs/sit_xl_2.py'))
  abstract = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(abstract))
  assert abstract.level_embedder is None and 'level_embedder' not in params
  assert len(params['x_embedders']) == 1 and len(params['final_linears']) == 1
  assert params['x_embedders'][0]['kernel'].shape == (2 * 2 * 4, 1152)
  assert params['final_linears'][0]['kernel'].shape == (1152, 2 * 2 * 8)
  assert len(params['blocks']) == 28
  # SiT-XL/2's released state dict: 675,129,632 numbers incl. the fixed 256 x 1152 pos_embed.
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  assert count == 675_129_632 - 256 * 1152
