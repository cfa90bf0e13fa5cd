"""Per-patch-size low-rank adapters (FlexiDiT §3.2) on the shared blocks' linear layers.

With `config.model.lora_rank = r > 0`, every linear layer named in `config.model.lora_targets`
('qkv', 'proj' of attention, 'fc1', 'fc2' of the MLP) in every shared block gets a sibling
`<name>_lora` holding one adapter per stage (patch size): a: (S, d_in, r), b: (S, r, d_out), so
stage s computes W x + (x a_s) b_s. b starts at zero (the adapted model starts as the base).
Training then updates only the adapters (train.py freezes the rest: `trainable_mask`).

Where a pass mixes stages (packed training rows, FlexiDiT's packed weak guidance), each token
takes its own sample's adapter through a per-token one-hot of its stage (the same per-token
broadcast as the adaLN modulation, dit.per_token). For sampling, a one-stage program folds its
stage's adapters into the kernels first (`fold_into`: W + a_s b_s, once per program), so it runs
exactly the base model's FLOPs. `merged_params` exports that fold as plain params of the base
model (`base_config`), one stage at a time; `add_adapters` starts adapters on base params
(`train.init_from` a base checkpoint).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

TARGETS = ('qkv', 'proj', 'fc1', 'fc2')
SUFFIX = '_lora'


class StageLoRA(nnx.Module):
  """One adapter per stage for a (d_in -> d_out) linear layer."""

  def __init__(self, d_in: int, d_out: int, rank: int, num_stages: int, *, param_dtype,
               rngs: nnx.Rngs):
    replicated = (None, None, None)  # small: every device keeps the whole adapter
    self.a = nnx.Param(jax.random.normal(rngs.params(), (num_stages, d_in, rank), param_dtype)
                       / math.sqrt(d_in), out_sharding=replicated, eager_sharding=False)
    self.b = nnx.Param(jnp.zeros((num_stages, rank, d_out), param_dtype), out_sharding=replicated,
                       eager_sharding=False)

  def __call__(self, x: jax.Array, stage_weights: jax.Array) -> jax.Array:
    """x: (B, L, d_in); stage_weights: (B, 1 or L, S) one-hot stage per sample or token ->
    (B, L, d_out) the adapter's contribution."""
    u = jnp.einsum('bld,sdr->blsr', x, self.a.astype(x.dtype))
    return jnp.einsum('blsr,sro->blo', u * stage_weights[..., None].astype(x.dtype),
                      self.b.astype(x.dtype))


def maybe_adapter(config_lora: tuple[int, int, tuple[str, ...]] | None, name: str, d_in: int,
                  d_out: int, *, param_dtype, rngs: nnx.Rngs) -> StageLoRA | None:
  """The adapter of layer `name` if (rank, num_stages, targets) names it, else None."""
  if not config_lora or name not in config_lora[2]:
    return None
  rank, num_stages, _ = config_lora
  return StageLoRA(d_in, d_out, rank, num_stages, param_dtype=param_dtype, rngs=rngs)


def adapted(linear: nnx.Linear, adapter: StageLoRA | None, x: jax.Array,
            stage_weights: jax.Array | None) -> jax.Array:
  """linear(x), plus the adapter's term when there is one (x: (B, L, d_in))."""
  out = linear(x)
  if adapter is None:
    return out
  if stage_weights is None:
    raise ValueError('a LoRA layer needs the stage of every sample (stage_weights)')
  return out + adapter(x, stage_weights).astype(out.dtype)


def settings(config: ml_collections.ConfigDict) -> tuple[int, int, tuple[str, ...]] | None:
  """(rank, number of stages, targets) of config.model's adapters, or None without LoRA."""
  m = config.model
  if not m.lora_rank:
    return None
  return m.lora_rank, len(config.schedule.patch_sizes), tuple(m.lora_targets)


def base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` without adapters: the model the base params (and merged exports) fit."""
  base = ml_collections.ConfigDict(config.to_dict())
  base.model.lora_rank = 0
  return base


def _delta(adapter: dict, stage: int) -> jax.Array:
  """a_s b_s of an adapter's pure dict ({'a': (..., S, d_in, r), 'b': (..., S, r, d_out)}); a
  leading (depth,) axis of scanned blocks is kept."""
  return jnp.einsum('...dr,...ro->...do', adapter['a'][..., stage, :, :],
                    adapter['b'][..., stage, :, :])


def fold_into(model: nnx.Module, stage: int) -> None:
  """Folds `stage`'s adapters into their linear layers' kernels and drops the adapters, in place
  (inside a sampler program: the merged model costs what the base model costs)."""
  for _, module in list(nnx.iter_graph(model)):
    if not isinstance(module, nnx.Module):
      continue
    for name in TARGETS:
      adapter = getattr(module, name + SUFFIX, None)
      if isinstance(adapter, StageLoRA):
        kernel = getattr(module, name).kernel
        delta = _delta(dict(a=adapter.a[...], b=adapter.b[...]), stage)
        kernel.value = kernel[...] + delta.astype(kernel.dtype)
        setattr(module, name + SUFFIX, None)


def is_adapter_path(path: tuple) -> bool:
  """Whether a pure-dict key path lies inside an adapter."""
  return any(str(getattr(k, 'key', k)).endswith(SUFFIX) for k in path)


def trainable_mask(params) -> dict:
  """The params tree with True on adapter leaves, False on the (frozen) base."""
  return jax.tree_util.tree_map_with_path(lambda p, _: is_adapter_path(p), params)


def merged_params(params: dict, stage: int) -> dict:
  """Pure params of the LoRA model -> pure params of `base_config`'s model whose shared blocks
  carry `stage`'s adapters folded in (exactly that stage's function; the export format)."""
  def walk(tree):
    if not isinstance(tree, dict):
      return tree
    out = {}
    for k, v in tree.items():
      if str(k).endswith(SUFFIX):
        continue
      v = walk(v)
      adapter = tree.get(f'{k}{SUFFIX}')
      if adapter is not None:
        v = dict(v, kernel=v['kernel'] + _delta(adapter, stage).astype(v['kernel'].dtype))
      out[k] = v
    return out
  return walk(params)


def add_adapters(base: dict, target: dict, key: jax.Array) -> dict:
  """Base params + fresh adapters where `target` (the LoRA model's abstract params, same layout)
  has them: a ~ N(0, 1/d_in), b = 0, so the result computes exactly the base model."""
  def walk(tree, want, key):
    out = {}
    for i, (k, v) in enumerate(want.items()):
      if str(k).endswith(SUFFIX):
        d_in = v['a'].shape[-2]
        out[k] = dict(a=jax.random.normal(jax.random.fold_in(key, i), v['a'].shape,
                                          v['a'].dtype) / math.sqrt(d_in),
                      b=jnp.zeros(v['b'].shape, v['b'].dtype))
      elif isinstance(v, dict):
        out[k] = walk(base_at(tree, k), v, jax.random.fold_in(key, i))
      else:
        out[k] = base_at(tree, k)
    return out

  def base_at(tree, k):
    if k not in tree:
      raise KeyError(f'base params lack {k!r} that the LoRA model has besides its adapters')
    return tree[k]
  return walk(base, target, key)
