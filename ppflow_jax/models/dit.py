"""SiT/DiT building blocks shared by every stage: embedders, adaLN-Zero blocks, final norm.

Everything follows SiT (Ma et al. 2024) exactly so pretrained weights import one-to-one
(`convert/`): LayerNorms with eps 1e-6 and no affine parameters, tanh-GELU MLP of ratio 4, fused
qkv with rows [q|k|v], adaLN chunks (shift, scale, gate) for attention then MLP, `x*(1+scale)+shift`,
sin-cos embeddings in SiT's layout, and SiT's initialisation (xavier-uniform linears, N(0, 0.02)
label table and timestep MLP, zeros for every adaLN output).

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `vocab`); `sharding.py` maps them
to mesh axes. Conditioning may be per sample or per token (packed rows): blocks take the
per-sample conditioning `c: (S, d)` and a `TokenLayout` that says which sample each token is.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppflow_jax import sharding
from ppflow_jax.models import lora as lora_lib
from ppflow_jax.ops import attention as attention_ops

LN_EPS = 1e-6
TIME_FREQ_DIM = 256

xavier = nnx.initializers.xavier_uniform()
normal02 = nnx.initializers.normal(0.02)
zeros = nnx.initializers.zeros_init()


def logical(init, axes: tuple[str | None, ...]):
  """An initializer annotated with logical axis names; placement happens in sharding.py."""
  return nnx.with_partitioning(init, axes, eager_sharding=False)


class TokenLayout(NamedTuple):
  """Where the tokens of a packed (R, L, d) array come from (built by packing.PackPlan).

  segment_ids: (R, L) int32; tokens attend only within equal ids; 0 marks padding.
  groups: static (rows, samples_per_row, sample_length, num_samples) per stage, in row order:
    each row holds `samples_per_row` consecutive samples of `sample_length` tokens.
  """
  segment_ids: jax.Array
  groups: tuple[tuple[int, int, int, int], ...]


def per_token(values: jax.Array, layout: TokenLayout | None) -> jax.Array:
  """values: (S, k) per sample -> broadcastable per-token values.

  Unpacked (S == B): (S, 1, k). Packed: (R, L, k), each token getting its own sample's row. The
  samples are first placed in their rows' slots, (R, P, k) with P the most samples a row holds
  (small: one value per sample), then spread over each row's tokens by a static one-hot product
  (R, L, P): both steps keep a row on the chip that holds it, where concatenating per-token
  (R, L, k) arrays of different stages would move them across a batch-sharded mesh (and back in
  the backward pass): the bulk of the XL train step's collectives (docs/tpu_aot.md).
  """
  if layout is None:
    return values[:, None, :]
  slots = max(per_row for _, per_row, _, _ in layout.groups)
  out, start = [], 0
  for rows, per_row, _, count in layout.groups:
    v = jnp.pad(values[start:start + count], ((0, rows * per_row - count), (0, 0)))
    out.append(jnp.pad(v.reshape(rows, per_row, -1), ((0, 0), (0, slots - per_row), (0, 0))))
    start += count
  onehot = jnp.asarray(_slot_onehot(layout.groups, slots), values.dtype)
  return jnp.einsum('rlp,rpk->rlk', onehot, jnp.concatenate(out),
                    precision=jax.lax.Precision.HIGHEST)  # exact: one 1.0 per token


@functools.lru_cache(maxsize=None)
def _slot_onehot(groups: tuple, slots: int) -> np.ndarray:
  """(R, L, slots) float32: token t of a row whose samples have `length` tokens is slot t // length."""
  blocks = []
  for rows, per_row, length, _ in groups:
    slot = np.arange(per_row * length) // length
    blocks.append(np.broadcast_to(np.eye(slots, dtype=np.float32)[slot], (rows, per_row * length, slots)))
  return np.concatenate(blocks)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale) + shift


def layer_norm(x: jax.Array) -> jax.Array:
  """LayerNorm without affine parameters (eps 1e-6), statistics in float32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + LN_EPS)).astype(x.dtype)


def timestep_frequencies(t: jax.Array, dim: int = TIME_FREQ_DIM) -> jax.Array:
  """t: (B,) in [0, 1], used as is (SiT) -> (B, dim) `[cos, sin]` of t * 10000^(-k / (dim/2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


@functools.lru_cache(maxsize=None)
def sincos_2d(dim: int, rows: int, cols: int) -> np.ndarray:
  """Fixed 2-D sin-cos embedding (rows * cols, dim), row-major, in SiT/MAE's layout.

  The first dim/2 features encode the column index, the last dim/2 the row index; each half is
  `[sin, cos]` of `pos * 10000^(-k / (dim/4))`.
  """
  def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  col, row = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64))
  emb = np.concatenate([one_axis(dim // 2, col), one_axis(dim // 2, row)], axis=1)
  return emb.astype(np.float32)


class TimestepEmbedder(nnx.Module):
  """t: (B,) -> (B, d): sinusoidal frequencies, then Linear-SiLU-Linear."""

  def __init__(self, d: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, bias_init=zeros)
    self.mlp_in = nnx.Linear(TIME_FREQ_DIM, d, kernel_init=logical(normal02, (None, 'embed')), **kw)
    self.mlp_out = nnx.Linear(d, d, kernel_init=logical(normal02, ('mlp', 'embed')), **kw)

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.mlp_out(nnx.silu(self.mlp_in(timestep_frequencies(t))))


class MLP(nnx.Module):
  """(..., d) -> (..., d): Linear(d, r*d), tanh-GELU, Linear(r*d, d); optional per-stage LoRA
  (`lora`: (rank, stages, targets), models/lora.py)."""

  def __init__(self, d: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs, lora=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, bias_init=zeros)
    self.fc1 = nnx.Linear(d, hidden, kernel_init=logical(xavier, ('embed', 'mlp')), **kw)
    self.fc2 = nnx.Linear(hidden, d, kernel_init=logical(xavier, ('mlp', 'embed')), **kw)
    adapter = functools.partial(lora_lib.maybe_adapter, lora, param_dtype=param_dtype, rngs=rngs)
    self.fc1_lora, self.fc2_lora = adapter('fc1', d, hidden), adapter('fc2', hidden, d)

  def __call__(self, x: jax.Array, stage_weights: jax.Array | None = None) -> jax.Array:
    """x: (B, L, d); stage_weights: (B, 1 or L, S) one-hot stages (LoRA only) -> (B, L, d)."""
    h = jax.nn.gelu(lora_lib.adapted(self.fc1, self.fc1_lora, x, stage_weights), approximate=True)
    return lora_lib.adapted(self.fc2, self.fc2_lora, h, stage_weights)


class Attention(nnx.Module):
  """Multi-head self-attention with fused qkv (rows [q|k|v], heads split inside each)."""

  def __init__(self, d: int, num_heads: int, *, impl: str, dtype, param_dtype, rngs: nnx.Rngs,
               lora=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, bias_init=zeros)
    self.num_heads = num_heads
    self.impl = impl
    self.qkv = nnx.Linear(d, 3 * d, kernel_init=logical(xavier, ('embed', 'heads')), **kw)
    self.proj = nnx.Linear(d, d, kernel_init=logical(xavier, ('heads', 'embed')), **kw)
    adapter = functools.partial(lora_lib.maybe_adapter, lora, param_dtype=param_dtype, rngs=rngs)
    self.qkv_lora, self.proj_lora = adapter('qkv', d, 3 * d), adapter('proj', d, d)

  def __call__(self, x: jax.Array, layout: TokenLayout | None,
               stage_weights: jax.Array | None = None) -> jax.Array:
    """x: (B, L, d); layout: packed rows' TokenLayout or None; stage_weights: see MLP
    -> (B, L, d)."""
    b, l, d = x.shape
    qkv = lora_lib.adapted(self.qkv, self.qkv_lora, x, stage_weights)
    qkv = qkv.reshape(b, l, 3, self.num_heads, d // self.num_heads)
    segment_ids, row_blocks = None, None
    if layout is not None:
      segment_ids = layout.segment_ids
      row_blocks = tuple((rows, per_row) for rows, per_row, _, _ in layout.groups)
    out = attention_ops.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], segment_ids,
                                  impl=self.impl, row_blocks=row_blocks)
    return lora_lib.adapted(self.proj, self.proj_lora, out.reshape(b, l, d), stage_weights)


class DiTBlock(nnx.Module):
  """adaLN-Zero transformer block: the parameters every stage shares."""

  def __init__(self, d: int, num_heads: int, mlp_ratio: float, *, impl: str, dtype,
               param_dtype, rngs: nnx.Rngs, lora=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn = Attention(d, num_heads, impl=impl, lora=lora, **kw)
    self.mlp = MLP(d, int(d * mlp_ratio), lora=lora, **kw)
    self.adaLN_modulation = nnx.Linear(d, 6 * d, kernel_init=logical(zeros, ('embed', 'mlp')),
                                       bias_init=zeros, **kw)

  def __call__(self, x: jax.Array, c: jax.Array, layout: TokenLayout | None,
               stage_weights: jax.Array | None = None) -> jax.Array:
    """x: (B, L, d) tokens; c: (S, d) per-sample conditioning; stage_weights: per-token one-hot
    stages for LoRA (see MLP) -> (B, L, d)."""
    x = sharding.constrain(x, ('batch', None, None))  # rows stay data-parallel through packing
    mod = per_token(self.adaLN_modulation(nnx.silu(c)), layout)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    x = x + gate_msa * self.attn(modulate(layer_norm(x), shift_msa, scale_msa), layout,
                                 stage_weights)
    return x + gate_mlp * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp), stage_weights)


class FinalModulation(nnx.Module):
  """The final LayerNorm and its adaLN (shift, scale), shared by all stages' de-embeddings."""

  def __init__(self, d: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.adaLN_modulation = nnx.Linear(d, 2 * d, kernel_init=logical(zeros, ('embed', 'mlp')),
                                       bias_init=zeros, dtype=dtype, param_dtype=param_dtype,
                                       rngs=rngs)

  def __call__(self, x: jax.Array, c: jax.Array, layout: TokenLayout | None) -> jax.Array:
    """x: (B, L, d); c: (S, d) -> (B, L, d) normalised and modulated tokens."""
    shift, scale = jnp.split(per_token(self.adaLN_modulation(nnx.silu(c)), layout), 2, axis=-1)
    return modulate(layer_norm(x), shift, scale)
