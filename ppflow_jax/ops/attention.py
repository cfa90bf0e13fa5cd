"""Segment-masked self-attention: one dispatcher over an XLA reference and fused TPU/GPU kernels.

Every implementation computes, per batch row and head,
  out = softmax(q k^T / sqrt(D) masked to equal segment ids) v,
so tokens of different packed samples never see each other: scores of other segments get a
large negative number (exp gives exactly 0); an additive 0/1 float mask, as in the official PPFlow
code, would let packed samples attend to each other.

Implementations (`impl`, config field `model.attention`):
  'xla'        dense scores in float32 on canonical batched matmuls; the reference and CPU path.
  'splash'     TPU Pallas splash attention with `SegmentIds`.
  'pallas_gpu' Triton flash attention (jax.experimental.pallas.ops.gpu) with segment ids.
  'cudnn'      cuDNN flash attention via `jax.nn.dot_product_attention`, for unpacked batches.
  'auto'       the best of these for the backend, sequence length and dtype (`select_impl`).
The Pallas kernels run in interpret mode on CPU (slow; for tests). Kernels are opaque to the XLA
partitioner, so with a device mesh they run per shard inside `jax.shard_map`: batch over the
('data', 'fsdp') axes, heads over 'tensor'. See docs/attention.md.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu import attention as triton_attention
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

IMPLS = ('auto', 'xla', 'splash', 'pallas_gpu', 'cudnn')
BATCH_AXES = ('data', 'fsdp')
HEAD_AXIS = 'tensor'
# 'auto' uses XLA below this length on TPU/GPU: splash pads to 128 tokens anyway and XLA's dense
# (B, H, L, L) scores are small there. Provisional until the GPU/TPU benchmark tunes it.
MIN_KERNEL_LEN = 128
# Sequence block sizes, largest first; a kernel uses the largest one dividing the padded length.
SPLASH_BLOCKS = (512, 256, 128)      # splash needs multiples of 128 (TPU lanes).
TRITON_BLOCKS = (128, 64, 32, 16)    # Triton dots need >= 16 rows.
TRITON_BWD_BLOCK = 32                # upstream default for the backward kernels.
# Finite, so that exp(masked - max) is exactly 0 without inf arithmetic (same as the kernels).
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None, *,
              impl: str = 'auto',
              mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
              interpret: bool | None = None,
              row_blocks: Sequence[tuple[int, int]] | None = None) -> jax.Array:
  """Multi-head self-attention where tokens attend only within their segment.

  Args:
    q, k, v: (B, L, H, D), unscaled (1/sqrt(D) is applied here).
    segment_ids: (B, L) integer ids or None (one segment per row). Padding tokens must carry an id
      of their own (the packer uses 0, samples >= 1) so that no row is fully masked.
    impl: one of IMPLS; 'cudnn' and 'auto' resolve with `select_impl`.
    mesh: mesh whose batch axes ('data', 'fsdp') shard B and whose 'tensor' axis shards H; kernels
      then run per shard in `jax.shard_map`. None: the ambient mesh of `jax.set_mesh`, if any.
    interpret: run the Pallas kernels in interpret mode; None = only when the backend is CPU.
    row_blocks: optional static structure of `segment_ids`, as `packing.PackPlan` lays rows out:
      consecutive groups of (rows, k), the group's rows each holding k equal, aligned segments of
      L / k tokens (ids as in `segment_ids`; padding slots are segments too). Sums of rows = B.
      The XLA path then attends within each group's (rows * k, L / k) blocks unmasked: the same
      result with k times fewer scores (docs/attention.md). Ignored by the kernels and when the
      batch is sharded over the mesh (its groups need not start on shard boundaries).

  The backend is the platform of the mesh's devices (`mesh`, else the ambient one), so a program
  compiled ahead of time for a TPU topology from a CPU host gets the Mosaic TPU kernels; without
  a mesh it is the process default backend.

  Returns:
    (B, L, H, D) in q.dtype.
  """
  _check_inputs(q, k, v, segment_ids)
  backend = _backend(mesh)
  chosen = select_impl(impl, backend=backend, segmented=segment_ids is not None, dtype=q.dtype,
                       seq_len=q.shape[1], head_dim=q.shape[3])
  if chosen == 'xla':  # plain XLA ops: the partitioner shards them like the rest of the model.
    if segment_ids is not None and row_blocks is not None and _shards(mesh)[0] == 1:
      return _blockwise_xla_attention(q, k, v, row_blocks)
    return _xla_attention(q, k, v, segment_ids)
  if interpret is None:
    interpret = backend == 'cpu'
  kernels = {
      'splash': lambda *a: _splash_attention(*a, interpret=interpret),
      'pallas_gpu': lambda *a: _triton_attention(*a, interpret=interpret),
      'cudnn': _cudnn_attention,
  }
  return _per_shard(kernels[chosen], q, k, v, segment_ids, mesh)


def select_impl(impl: str, *, backend: str, segmented: bool, dtype, seq_len: int,
                head_dim: int) -> str:
  """The implementation `attention` runs: 'xla' | 'splash' | 'pallas_gpu' | 'cudnn'.

  'auto': TPU -> 'splash'; GPU -> 'cudnn' for unpacked half-precision batches it supports, else
  'pallas_gpu'; both only from MIN_KERNEL_LEN tokens on, 'xla' below and on CPU.
  'cudnn' is used only where it applies (GPU, no segment ids, bf16/fp16, head_dim a multiple of 8
  and <= 128); otherwise it falls back to the 'auto' choice.
  'splash' / 'pallas_gpu' run on their own backend, or interpreted on CPU.
  """
  if impl not in IMPLS:
    raise ValueError(f'attention impl={impl!r} is not one of {IMPLS} (config: model.attention).')
  cudnn_ok = (backend == 'gpu' and not segmented
              and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
              and head_dim % 8 == 0 and head_dim <= 128)
  if impl == 'cudnn':
    return 'cudnn' if cudnn_ok else select_impl('auto', backend=backend, segmented=segmented,
                                                dtype=dtype, seq_len=seq_len, head_dim=head_dim)
  if impl == 'auto':
    if seq_len < MIN_KERNEL_LEN or backend not in ('tpu', 'gpu'):
      return 'xla'
    if backend == 'tpu':
      return 'splash'
    return 'cudnn' if cudnn_ok else 'pallas_gpu'
  home = {'splash': 'tpu', 'pallas_gpu': 'gpu'}.get(impl)
  if home is not None and backend not in (home, 'cpu'):
    raise ValueError(f'attention impl={impl!r} needs a {home.upper()} (or CPU, interpreted); the '
                     f"backend is {backend!r}. Use impl='auto' or 'xla'.")
  return impl


def _backend(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None) -> str:
  """'cpu' | 'gpu' | 'tpu': the platform the program is compiled for (see `attention`)."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if isinstance(mesh, jax.sharding.Mesh):
    mesh = mesh.abstract_mesh
  device = None if mesh.empty else mesh.abstract_device
  platform = jax.default_backend() if device is None else device.platform
  return 'gpu' if platform in ('cuda', 'rocm') else platform


def _check_inputs(q, k, v, segment_ids) -> None:
  if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
    raise ValueError('attention expects q, k, v of the same shape (B, L, H, D); got '
                     f'q{q.shape}, k{k.shape}, v{v.shape}.')
  if segment_ids is not None:
    if segment_ids.shape != q.shape[:2]:
      raise ValueError(f'segment_ids must be (B, L) = {q.shape[:2]}; got {segment_ids.shape}.')
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f'segment_ids must be integers; got {segment_ids.dtype}.')


def _xla_attention(q, k, v, segment_ids):
  """The reference and the CPU path: (B, L, H, D) -> (B, L, H, D), scores and softmax in float32.

  Written for XLA's dot emitter (measured on CPU, docs/attention.md): heads move before length so
  both products are canonical batched matmuls (batch dims leading), q is scaled before the
  product (L*D multiplies instead of L*L), and the softmax is normalised after the product with
  v (one divide per output element instead of one per score; exp(s - max) is in [0, 1]).
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)  # rounded once, as the kernels do
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # (B, H, L, D)
  s = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32)
  if segment_ids is not None:
    # One (B, 1, Lq, Lk) bias shared by the heads: adding it is cheaper on CPU than a select per
    # score (measured, docs/attention.md), and exp(s + _MASK_VALUE - max) is exactly 0 all the same.
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    s = s + jnp.where(same, 0.0, _MASK_VALUE)
  # The max only shifts the exponent (it cancels in the ratio), so it needs no gradient.
  e = jnp.exp(s - jax.lax.stop_gradient(s.max(axis=-1, keepdims=True)))
  out = jnp.einsum('bhqk,bhkd->bhqd', e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out / e.sum(axis=-1, keepdims=True)
  return out.transpose(0, 2, 1, 3).astype(q.dtype)


def _blockwise_xla_attention(q, k, v, row_blocks):
  """`_xla_attention` with each group's aligned segments as rows of their own: (B, L, H, D)."""
  b, l, h, d = q.shape
  if sum(rows for rows, _ in row_blocks) != b or any(l % per_row for _, per_row in row_blocks):
    raise ValueError(f'row_blocks {tuple(row_blocks)} do not tile a batch of {b} rows of {l} '
                     'tokens into aligned segments.')
  out, start = [], 0
  for rows, per_row in row_blocks:
    split = lambda x: x[start:start + rows].reshape(rows * per_row, l // per_row, h, d)
    blocks = _xla_attention(split(q), split(k), split(v), None)
    out.append(blocks.reshape(rows, l, h, d))
    start += rows
  return jnp.concatenate(out)


def _splash_attention(q, k, v, segment_ids, *, interpret: bool):
  """TPU splash attention on (B, L, H, D); L is padded to a multiple of 128."""
  b, l, h, d = q.shape
  # Splash does not scale; scale in float32 so a bf16 q is rounded once.
  q = (q.astype(jnp.float32) / math.sqrt(d)).astype(q.dtype)
  lp = _round_up(l, SPLASH_BLOCKS[-1])
  q, k, v, segment_ids = _pad_length(q, k, v, segment_ids, lp)
  blk = _largest_divisor(lp, SPLASH_BLOCKS)
  blocks = splash.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk,
                             block_q_dkv=blk, block_kv_dkv=blk, block_kv_dkv_compute=blk,
                             block_q_dq=blk, block_kv_dq=blk)
  # Segment ids carry all the masking, so the static mask is full (no block is skipped).
  mask = splash.MultiHeadMask([splash.FullMask((lp, lp))] * h)
  kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # (B, H, L, D): the kernel's layout.
  if segment_ids is None:
    out = jax.vmap(kernel)(q, k, v)
  else:
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(
        q, k, v, segment_ids)
  return out.transpose(0, 2, 1, 3)[:, :l]


def _triton_attention(q, k, v, segment_ids, *, interpret: bool):
  """Triton flash attention on (B, L, H, D); L is padded to a multiple of 16."""
  l, d = q.shape[1], q.shape[3]
  lp = _round_up(l, TRITON_BLOCKS[-1])
  q, k, v, segment_ids = _pad_length(q, k, v, segment_ids, lp)
  blk = _largest_divisor(lp, TRITON_BLOCKS)
  bwd = min(blk, TRITON_BWD_BLOCK)  # a power of two dividing blk, hence lp.
  blocks = triton_attention.BlockSizes(block_q=blk, block_k=blk, block_q_dkv=bwd,
                                       block_kv_dkv=bwd, block_q_dq=bwd, block_kv_dq=bwd)
  out = triton_attention.mha(q, k, v, segment_ids, sm_scale=1.0 / math.sqrt(d),
                             block_sizes=blocks, interpret=interpret)
  return out[:, :l]


def _cudnn_attention(q, k, v, segment_ids):
  """cuDNN flash attention on (B, L, H, D); only reached without segment ids (select_impl)."""
  assert segment_ids is None
  return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')


def _pad_length(q, k, v, segment_ids, length: int):
  """Pads L to `length` with zero tokens in a segment of their own (an id no real token has)."""
  b, l = q.shape[:2]
  if length == l:
    return q, k, v, segment_ids
  if segment_ids is None:
    segment_ids = jnp.zeros((b, l), jnp.int32)
  segment_ids = segment_ids.astype(jnp.int32)
  pad_ids = jnp.full((b, length - l), jnp.min(segment_ids) - 1, jnp.int32)
  widths = ((0, 0), (0, length - l), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
  return q, k, v, jnp.concatenate([segment_ids, pad_ids], axis=1)


def _per_shard(kernel, q, k, v, segment_ids, mesh):
  """Runs `kernel(q, k, v, segment_ids)` per (batch, head) shard of `mesh`, or directly."""
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  batch_shards, head_shards, batch_axes, head_axis = _shards(mesh)
  if batch_shards * head_shards == 1:
    return kernel(q, k, v, segment_ids)
  b, _, h, _ = q.shape
  if b % batch_shards or h % head_shards:
    raise ValueError(
        f'attention on mesh {dict(mesh.shape)}: batch {b} must divide by {batch_axes} = '
        f'{batch_shards} and heads {h} by {head_axis!r} = {head_shards}; change the batch size '
        'or the mesh.')
  qkv_spec = P(batch_axes or None, None, head_axis, None)
  ids_spec = P(batch_axes or None, None)
  if set(mesh.explicit_axes) & {*batch_axes, head_axis}:  # explicit axes: shard_map won't reshard.
    q, k, v = jax.reshard((q, k, v), jax.sharding.NamedSharding(mesh, qkv_spec))
    if segment_ids is not None:
      segment_ids = jax.reshard(segment_ids, jax.sharding.NamedSharding(mesh, ids_spec))
  # Pallas calls have no replication (vma) rules, hence check_vma=False.
  if segment_ids is None:
    fn = jax.shard_map(lambda q, k, v: kernel(q, k, v, None), mesh=mesh,
                       in_specs=(qkv_spec,) * 3, out_specs=qkv_spec, check_vma=False)
    return fn(q, k, v)
  fn = jax.shard_map(kernel, mesh=mesh, in_specs=(qkv_spec,) * 3 + (ids_spec,),
                     out_specs=qkv_spec, check_vma=False)
  return fn(q, k, v, segment_ids)


def _shards(mesh):
  """(batch shards, head shards, batch axes, head axis) of the mesh's axes that are not manual."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  manual = set(mesh.manual_axes)
  sizes = {} if mesh.empty else dict(mesh.shape)
  batch_axes = tuple(a for a in BATCH_AXES if a in sizes and a not in manual)
  head_axis = HEAD_AXIS if HEAD_AXIS in sizes and HEAD_AXIS not in manual else None
  return (math.prod(sizes[a] for a in batch_axes), sizes[head_axis] if head_axis else 1,
          batch_axes, head_axis)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _largest_divisor(n: int, candidates: Sequence[int]) -> int:
  return next(c for c in candidates if n % c == 0)
