"""The attention dispatcher: kernel parity with the XLA reference (CPU, Pallas interpret mode),
segment isolation, the cuDNN fallback, the 'auto' choice per backend, and per-shard execution."""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppflow_jax.ops import attention as attn

KERNELS = ('splash', 'pallas_gpu')
H, D = 2, 32


def _segments(kind: str, length: int) -> np.ndarray | None:
  """(2, length) ids: 'packed' = four equal samples per row, row 1 ending in a padding segment (0);
  'ragged' = unequal samples, interleaved padding; 'none' = no segment ids."""
  if kind == 'none':
    return None
  q = length // 4
  if kind == 'packed':
    row0 = np.repeat([1, 2, 3, 4], q)
    row1 = np.concatenate([np.repeat([1, 2, 3], q), np.zeros(length - 3 * q, int)])
  else:
    row0 = np.concatenate([np.full(5, 3), np.full(length - 13, 1), np.zeros(8, int)])
    row1 = np.concatenate([np.zeros(3, int), np.full(length - 3, 7)])
  return np.stack([row0, row1]).astype(np.int32)


def _qkv(length: int, dtype=jnp.float32, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, (2, length, H, D), jnp.float32).astype(dtype) for k in keys)


def _run(impl, q, k, v, seg, **kw):
  return jax.jit(lambda q, k, v, s: attn.attention(q, k, v, s, impl=impl, **kw))(q, k, v, seg)


def _grads(impl, q, k, v, seg, cot):
  loss = lambda q, k, v: jnp.sum(attn.attention(q, k, v, seg, impl=impl) * cot)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def test_xla_reference_equals_attention_within_each_segment():
  """The reference equals plain softmax attention run on each segment's tokens alone (numpy)."""
  q, k, v = (np.asarray(x, np.float64) for x in _qkv(40))
  seg = _segments('ragged', 40)
  out = np.asarray(attn.attention(*map(jnp.asarray, (q, k, v)), jnp.asarray(seg), impl='xla'))
  for b in range(2):
    for sid in np.unique(seg[b]):
      idx = seg[b] == sid
      s = np.einsum('qhd,khd->hqk', q[b, idx], k[b, idx]) / math.sqrt(D)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      np.testing.assert_allclose(out[b, idx], np.einsum('hqk,khd->qhd', p, v[b, idx]),
                                 atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('kind', ['ragged', 'none'])
def test_xla_gradients_match_textbook_softmax_attention(kind):
  """The fast XLA formulation (heads first, late normalisation) has the textbook gradients."""
  q, k, v = _qkv(40)
  seg = _segments(kind, 40)
  cot = jax.random.normal(jax.random.key(3), q.shape)

  def textbook(q, k, v):
    s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(D)
    if seg is not None:
      s = jnp.where((seg[:, :, None] == seg[:, None, :])[:, None], s, -jnp.inf)
    return jnp.sum(jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, axis=-1), v) * cot)

  want = jax.grad(textbook, argnums=(0, 1, 2))(q, k, v)
  got = _grads('xla', q, k, v, None if seg is None else jnp.asarray(seg), cot)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('impl', KERNELS)
@pytest.mark.parametrize('length,kind', [(64, 'packed'), (64, 'none'), (40, 'ragged'),
                                         (40, 'none')])
def test_kernel_forward_matches_xla(impl, length, kind):
  q, k, v = _qkv(length)
  seg = _segments(kind, length)
  np.testing.assert_allclose(_run(impl, q, k, v, seg), _run('xla', q, k, v, seg),
                             atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize('impl', KERNELS)
@pytest.mark.parametrize('length,kind', [(64, 'packed'), (64, 'none'), (40, 'ragged')])
def test_kernel_gradients_match_xla(impl, length, kind):
  """d/dq, d/dk, d/dv through the kernels' custom VJPs, including the length padding."""
  q, k, v = _qkv(length)
  seg = _segments(kind, length)
  cot = jax.random.normal(jax.random.key(1), q.shape)
  for got, want in zip(_grads(impl, q, k, v, seg, cot), _grads('xla', q, k, v, seg, cot)):
    assert float(jnp.abs(want).max()) > 0.1  # a real gradient, not all zeros
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('impl', KERNELS)
def test_kernel_bf16_forward_matches_xla(impl):
  q, k, v = _qkv(64, jnp.bfloat16)
  seg = _segments('packed', 64)
  got = _run(impl, q, k, v, seg)
  assert got.dtype == jnp.bfloat16
  want = _run('xla', *(x.astype(jnp.float32) for x in (q, k, v)), seg)
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2, rtol=3e-2)


def test_row_blocks_attend_blockwise_with_the_masked_result(monkeypatch):
  """Rows laid out as PackPlan does (groups of k aligned equal segments, padding slots included)
  give the masked values and gradients, computed on (rows * k, L / k) blocks without a mask."""
  length = 32
  keys = jax.random.split(jax.random.key(3), 4)
  q, k, v, cot = (jax.random.normal(key, (3, length, H, D)) for key in keys)
  seg = np.stack([np.ones(length, int),  # group 1: one 32-token sample per row
                  np.repeat([1, 2, 3, 4], 8),  # group 2: four 8-token samples per row,
                  np.repeat([1, 2, 0, 0], 8)]).astype(np.int32)  # the last row half padding
  blocks = ((1, 1), (2, 4))
  shapes = []
  real = attn._xla_attention
  monkeypatch.setattr(attn, '_xla_attention', lambda *a: shapes.append(a[0].shape) or real(*a))
  masked = attn.attention(q, k, v, jnp.asarray(seg), impl='xla')
  assert shapes == [(3, length, H, D)]
  real_tokens = seg != 0  # padding outputs differ (never read back), so the loss skips them
  loss = lambda blocks: lambda q, k, v: jnp.sum(
      attn.attention(q, k, v, jnp.asarray(seg), impl='xla', row_blocks=blocks)
      * cot * real_tokens[:, :, None, None])
  blockwise = attn.attention(q, k, v, jnp.asarray(seg), impl='xla', row_blocks=blocks)
  assert shapes[1:] == [(1, length, H, D), (8, 8, H, D)]
  np.testing.assert_allclose(blockwise[real_tokens], masked[real_tokens], atol=1e-6, rtol=1e-6)
  for g_masked, g_blocks in zip(jax.grad(loss(None), (0, 1, 2))(q, k, v),
                                jax.grad(loss(blocks), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g_blocks, g_masked, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match='do not tile'):
    attn.attention(q, k, v, jnp.asarray(seg), impl='xla', row_blocks=((1, 1), (1, 4)))


@pytest.mark.parametrize('impl', ('xla', 'auto', 'cudnn') + KERNELS)
def test_packed_samples_do_not_see_each_other(impl):
  """Changing every token of sample 2 changes sample 2's outputs and nothing else in the row."""
  q, k, v = _qkv(64)
  seg = _segments('packed', 64)
  other = _qkv(64, seed=7)
  in2 = jnp.asarray(seg == 2)[:, :, None, None]
  q2, k2, v2 = (jnp.where(in2, o, x) for x, o in zip((q, k, v), other))
  before, after = _run(impl, q, k, v, seg), _run(impl, q2, k2, v2, seg)
  rest = seg != 2
  np.testing.assert_allclose(after[rest], before[rest], atol=1e-6, rtol=0)
  assert float(jnp.abs(after - before)[seg == 2].max()) > 0.1


def test_additive_float_mask_would_leak():
  """The check above catches the official code's bug: adding a 0/1 mask to the scores leaks."""
  q, k, v = _qkv(64)
  seg = _segments('packed', 64)
  other = _qkv(64, seed=7)
  in2 = jnp.asarray(seg == 2)[:, :, None, None]

  def additive(q, k, v):
    s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(D)
    s = s + (seg[:, None, :, None] == seg[:, None, None, :]).astype(jnp.float32)
    return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, -1), v)

  before = additive(q, k, v)
  after = additive(*(jnp.where(in2, o, x) for x, o in zip((q, k, v), other)))
  assert float(jnp.abs(after - before)[seg != 2].max()) > 1e-2


def test_cudnn_falls_back_on_cpu_and_with_segment_ids():
  q, k, v = _qkv(64)
  seg = _segments('packed', 64)
  assert jax.default_backend() == 'cpu'
  for s in (seg, None):
    np.testing.assert_array_equal(_run('cudnn', q, k, v, s), _run('xla', q, k, v, s))
  rule = dict(seq_len=256, head_dim=72)
  bf16 = dict(rule, dtype=jnp.bfloat16)
  assert attn.select_impl('cudnn', backend='gpu', segmented=False, **bf16) == 'cudnn'
  # Packed rows, float32, or an unsupported head dim: the 'auto' choice instead.
  assert attn.select_impl('cudnn', backend='gpu', segmented=True, **bf16) == 'pallas_gpu'
  assert attn.select_impl('cudnn', backend='gpu', segmented=False, seq_len=256, head_dim=72,
                          dtype=jnp.float32) == 'pallas_gpu'
  assert attn.select_impl('cudnn', backend='gpu', segmented=False, seq_len=256, head_dim=36,
                          dtype=jnp.bfloat16) == 'pallas_gpu'
  assert attn.select_impl('cudnn', backend='gpu', segmented=False, seq_len=64, head_dim=72,
                          dtype=jnp.bfloat16) == 'cudnn'
  assert attn.select_impl('cudnn', backend='tpu', segmented=False, **bf16) == 'splash'
  assert attn.select_impl('cudnn', backend='cpu', segmented=False, **bf16) == 'xla'


@pytest.mark.parametrize('backend,segmented,dtype,seq_len,want', [
    ('cpu', True, jnp.float32, 256, 'xla'),
    ('cpu', False, jnp.bfloat16, 256, 'xla'),
    ('tpu', True, jnp.float32, 256, 'splash'),
    ('tpu', False, jnp.bfloat16, 128, 'splash'),
    ('tpu', True, jnp.float32, 64, 'xla'),
    ('gpu', True, jnp.bfloat16, 256, 'pallas_gpu'),
    ('gpu', False, jnp.bfloat16, 256, 'cudnn'),
    ('gpu', False, jnp.float16, 128, 'cudnn'),
    ('gpu', False, jnp.float32, 256, 'pallas_gpu'),
    ('gpu', True, jnp.bfloat16, 64, 'xla'),
])
def test_auto_choice_per_backend(backend, segmented, dtype, seq_len, want):
  assert attn.select_impl('auto', backend=backend, segmented=segmented, dtype=dtype,
                          seq_len=seq_len, head_dim=72) == want


@pytest.mark.parametrize('backend,kernel', [('tpu', True), ('gpu', True), ('cpu', False)])
def test_auto_runs_the_backend_kernel(monkeypatch, backend, kernel):
  """With the backend name patched, 'auto' really calls a Pallas kernel (interpreted here)."""
  monkeypatch.setattr(attn, '_backend', lambda mesh=None: backend)
  q, k, v = _qkv(128)
  seg = _segments('packed', 128)
  fn = lambda q, k, v: attn.attention(q, k, v, seg, impl='auto', interpret=True)
  assert ('pallas_call' in str(jax.make_jaxpr(fn)(q, k, v))) == kernel
  np.testing.assert_allclose(jax.jit(fn)(q, k, v), _run('xla', q, k, v, seg), atol=2e-6,
                             rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
  q, k, v = _qkv(16)
  with pytest.raises(ValueError, match='not one of'):
    attn.attention(q, k, v, impl='flash')
  with pytest.raises(ValueError, match='same shape'):
    attn.attention(q, k[:, :8], v)
  with pytest.raises(ValueError, match=r'segment_ids must be \(B, L\)'):
    attn.attention(q, k, v, jnp.zeros((2, 8), jnp.int32))
  with pytest.raises(ValueError, match='integers'):
    attn.attention(q, k, v, jnp.zeros((2, 16), jnp.float32))
  with pytest.raises(ValueError, match='needs a TPU'):
    attn.select_impl('splash', backend='gpu', segmented=True, dtype=jnp.float32, seq_len=256,
                     head_dim=64)
  with pytest.raises(ValueError, match='needs a GPU'):
    attn.select_impl('pallas_gpu', backend='tpu', segmented=True, dtype=jnp.float32,
                     seq_len=256, head_dim=64)


_MESH_SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType
    from ppflow_jax.ops import attention as attn

    shapes = []
    for name in ('_splash_attention', '_triton_attention'):
      inner = getattr(attn, name)
      def spy(q, k, v, s, _inner=inner, **kw):
        shapes.append(q.shape)
        return _inner(q, k, v, s, **kw)
      setattr(attn, name, spy)

    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (4, 48, 2, 32)) for key in keys[:3])
    cot = jax.random.normal(keys[3], q.shape)
    seg = jnp.asarray(np.repeat([[1, 2, 3]], 4, 0).repeat(16, 1), jnp.int32)
    def grads(impl, mesh, seg):
      loss = lambda q, k, v: jnp.sum(attn.attention(q, k, v, seg, impl=impl, mesh=mesh) * cot)
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    def check(impl, axis_type, s, ambient=False):
      mesh = jax.make_mesh((2, 1, 2), ('data', 'fsdp', 'tensor'), axis_types=(axis_type,) * 3)
      shapes.clear()
      if ambient:  # the mesh of jax.set_mesh is used when none is passed
        with jax.set_mesh(mesh):
          got = grads(impl, None, s)
      else:
        got = grads(impl, mesh, s)
      assert shapes and all(sh == (2, 48, 1, 32) for sh in shapes), shapes
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(grads('xla', None, s))):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
      return mesh
    check('splash', AxisType.Auto, seg)
    check('pallas_gpu', AxisType.Auto, seg, ambient=True)
    mesh = check('splash', AxisType.Explicit, None)
    try:
      attn.attention(q[:3], k[:3], v[:3], seg[:3], impl='splash', mesh=mesh)
    except ValueError as e:
      assert 'must divide' in str(e), e
    else:
      raise AssertionError('an indivisible batch was accepted')
    print('MESH_OK')
''')


def test_kernels_run_per_shard_on_a_device_mesh():
  """On 4 fake CPU devices (2 data x 2 tensor), kernels see (B/2, L, H/2, D) and match xla."""
  root = pathlib.Path(__file__).resolve().parents[1]
  path = os.pathsep.join([str(root), os.environ.get('PYTHONPATH', '')])
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', PYTHONPATH=path)
  proc = subprocess.run([sys.executable, '-c', _MESH_SCRIPT], env=env, cwd=root,
                        capture_output=True, text=True, timeout=300)
  assert 'MESH_OK' in proc.stdout, proc.stdout + proc.stderr
