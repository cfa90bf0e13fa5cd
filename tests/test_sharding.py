"""Sharded training: mesh construction, real param/optimizer/batch shardings, and train steps on
2x4 (data x fsdp) and 2x2x2 (+ tensor) meshes of 8 fake CPU devices that match one device.

The multi-device checks need `--xla_force_host_platform_device_count=8` before JAX starts, so one
subprocess runs them all (one reference init, one compile per mesh and packing mode) and prints
its measurements as JSON; the tests below assert on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from ppflow_jax import sharding
from tests.helpers import ROOT, tiny_config

_SCRIPT = textwrap.dedent('''
  import json, sys
  import jax, jax.numpy as jnp, numpy as np, optax
  from tests.helpers import tiny_config
  from ppflow_jax import sharding, train

  assert len(jax.devices()) == 8, jax.devices()
  B = 16

  def config(mesh, packing, attention='xla'):
    c = tiny_config(2)
    # one block, hidden 32, 4 heads: divisible by every mesh axis; lr large enough that updates show.
    c.model.update(depth=1, num_heads=4, attention=attention)
    c.train.update(batch_size=B, packing=packing, lr=1e-2)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c

  def trainer(mesh, packing, attention='xla'):
    c = config(mesh, packing, attention)
    return train.Trainer(c, sharding.make_mesh(c, jax.devices()[:int(np.prod(mesh))]))

  rng = np.random.default_rng(0)
  batch = {'x': rng.normal(size=(B, 16, 16, 2)).astype(np.float32),
           'y': rng.integers(0, 5, B).astype(np.int32)}
  ref = trainer((1, 1, 1), True)
  with jax.set_mesh(ref.mesh):
    init = jax.device_get(ref.init_state())

  def two_steps(tr):
    """Loss and params after one and two steps from the shared initial state."""
    out = {}
    with jax.set_mesh(tr.mesh):
      state = jax.device_put(init, tr.state_sharding)  # donated by the step
      b = jax.device_put(batch, tr.batch_sharding)
      for i in (1, 2):
        state, m = tr.step(state, b)
        out[f'loss{i}'] = float(m['loss'])
        out[f'params{i}'] = jax.device_get(state.params)
    return out, state, b

  def diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  def spec(arr):
    return [list(a) if isinstance(a, tuple) else a for a in arr.sharding.spec]

  base, _, _ = two_steps(ref)
  result = {'ref_loss1': base['loss1'], 'ref_loss2': base['loss2'],
            'ref_update': diff(base['params1'], init.params)}
  for mesh, packing in (((2, 4, 1), True), ((2, 4, 1), False), ((2, 2, 2), True)):
    tr = trainer(mesh, packing)
    out, state, b = two_steps(tr)
    fc1 = state.params['blocks'][0]['mlp']['fc1']['kernel']
    mu = optax.tree_utils.tree_get(state.opt_state, 'mu')['blocks'][0]['mlp']['fc1']['kernel']
    result['x'.join(map(str, mesh)) + ('_packed' if packing else '_unpacked')] = dict(
        loss1=out['loss1'], loss2=out['loss2'],
        params1=diff(out['params1'], base['params1']),
        params2=diff(out['params2'], base['params2']),
        fc1_spec=spec(fc1), fc1_shard=list(fc1.addressable_shards[0].data.shape),
        mu_spec=spec(mu), mu_shard=list(mu.addressable_shards[0].data.shape),
        x_spec=spec(b['x']), x_shard=list(b['x'].addressable_shards[0].data.shape),
        qkv_shard=list(state.params['blocks'][0]['attn']['qkv']['kernel']
                       .addressable_shards[0].data.shape))

  # A fused kernel under the ambient mesh runs per shard (shard_map) on whole packed rows: 8 + 8
  # samples of 64 and 16 tokens fill 10 rows, padded to 16 for the 8 batch shards.
  tr = trainer((2, 4, 1), True, attention='pallas_gpu')
  with jax.set_mesh(tr.mesh):
    state = jax.device_put(init, tr.state_sharding)
    text = tr.step.lower(state, jax.device_put(batch, tr.batch_sharding)).as_text()
  result['kernel_per_shard'] = 'manual_computation' in text or 'shard_map' in text

  try:
    c = config((2, 4, 1), True)
    c.train.batch_size = 12
    train.Trainer(c, sharding.make_mesh(c))
    result['batch_error'] = ''
  except ValueError as e:
    result['batch_error'] = str(e)
  try:
    sharding.make_mesh(config((2, 2, 1), True))
    result['mesh_error'] = ''
  except ValueError as e:
    result['mesh_error'] = str(e)
  print('RESULT' + json.dumps(result))
''')


@pytest.fixture(scope='module')
def multi_device():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', _SCRIPT], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith('RESULT'))
  return json.loads(line[len('RESULT'):])


@pytest.mark.parametrize('run', ['2x4x1_packed', '2x4x1_unpacked', '2x2x2_packed'])
def test_sharded_step_matches_single_device(multi_device, run):
  r, ref = multi_device[run], multi_device
  assert r['loss1'] == pytest.approx(ref['ref_loss1'], rel=1e-5)
  assert r['loss2'] == pytest.approx(ref['ref_loss2'], rel=1e-5)
  assert ref['ref_update'] > 1e-3  # the step really moves the params (lr 1e-2), ...
  assert r['params1'] < 1e-5 and r['params2'] < 1e-5  # ... identically on the mesh


@pytest.mark.parametrize('run', ['2x4x1_unpacked', '2x2x2_packed'])
def test_params_optimizer_state_and_batch_are_sharded(multi_device, run):
  r = multi_device[run]
  fsdp, tensor = (4, 1) if run.startswith('2x4') else (2, 2)
  # fc1 kernel (d=32, 4d=128): 'embed' over fsdp, 'mlp' over tensor; Adam's mu mirrors it.
  assert r['fc1_spec'] == ['fsdp', 'tensor']
  assert r['fc1_shard'] == [32 // fsdp, 128 // tensor]
  assert r['mu_spec'] == r['fc1_spec'] and r['mu_shard'] == r['fc1_shard']
  assert r['qkv_shard'] == [32 // fsdp, 96 // tensor]
  assert r['x_spec'] == [['data', 'fsdp'], None, None, None]
  assert r['x_shard'] == [16 // (2 * fsdp), 16, 16, 2]


def test_fused_kernel_runs_per_shard_under_the_ambient_mesh(multi_device):
  assert multi_device['kernel_per_shard']


def test_batch_not_divisible_by_batch_shards_is_a_clear_error(multi_device):
  assert 'batch_size=12 is not divisible by the 8 batch shards' in multi_device['batch_error']


def test_mesh_sizes_must_match_device_count(multi_device):
  assert 'needs 4 devices, but 8 are available' in multi_device['mesh_error']
  c = tiny_config(2)
  c.mesh.update(data=-1, fsdp=-1, tensor=1)
  with pytest.raises(ValueError, match='at most one axis may be -1'):
    sharding.make_mesh(c)
  c.mesh.update(data=-1, fsdp=1, tensor=len(jax.devices()) + 1)
  with pytest.raises(ValueError, match='does not divide'):
    sharding.make_mesh(c)


def test_rules_map_logical_axes_and_skip_indivisible_dims():
  mesh = jax.make_mesh((1, 1, 1), sharding.AXES)
  assert sharding._mesh_axes(('batch', 'embed', 'mlp', 'heads', 'vocab', None)) == (
      ('data', 'fsdp'), 'fsdp', 'tensor', 'tensor', None, None)
  assert tuple(sharding._fit(('fsdp', 'tensor'), (6, 4), mesh)) == ('fsdp', 'tensor')
  fake = type('M', (), {'shape': {'data': 2, 'fsdp': 4, 'tensor': 2}})()
  assert tuple(sharding._fit((('data', 'fsdp'), 'tensor'), (12, 3), fake)) == (None, None)
  assert tuple(sharding._fit((('data', 'fsdp'), 'tensor'), (16, 4), fake)) == (
      ('data', 'fsdp'), 'tensor')
