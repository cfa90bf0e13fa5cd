"""The stack of shared DiT blocks: unrolled or scanned, with optional rematerialisation.

Two parameter layouts (config.model.scan_blocks), the only place that knows both:
  unrolled  params['blocks'][i][...]: one DiTBlock per layer, a Python loop (today's default;
            the layout of every SiT/PPFlow importer and of older checkpoints);
  scanned   params['blocks'][...] with a leading (depth,) axis on every leaf, run by one
            `jax.lax.scan`, so XLA compiles the block once instead of `depth` times.
`stack_params` / `unstack_params` / `to_layout` convert pure param dicts between them (importers,
params-only checkpoints and `init_from` call `to_layout`); a scanned model is initialised by
building the unrolled blocks and stacking them, so both layouts start from the same numbers.

Remat (config.model.remat) wraps each block call in `jax.checkpoint`:
  'none'  keep every activation (fastest, most memory);
  'full'  keep only each block's input, recompute the block in the backward pass;
  'dots'  keep matmul outputs without batch dimensions (the qkv/proj/MLP/adaLN linears) and
          recompute the rest (attention scores, norms, GELU): MaxText's usual middle ground.
"""

from __future__ import annotations

import copy
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BLOCKS = 'blocks'
LAYER_AXIS = 'layers'   # logical name of the stacked (depth,) axis; sharding.py replicates it.
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stack_modules(blocks: list[nnx.Module]) -> nnx.Module:
  """Identical-structure modules -> one module whose params carry a leading (len(blocks),) axis.

  The logical-axis metadata of every parameter gains LAYER_AXIS in front, so sharding.py places
  the stacked arrays like the per-layer ones.
  """
  graphdef = nnx.graphdef(blocks[0])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(b) for b in blocks))
  module = nnx.merge(graphdef, stacked)
  for _, var in nnx.iter_graph(module):
    if isinstance(var, nnx.Variable) and var.has_metadata('out_sharding'):
      axes = var.get_metadata('out_sharding')
      if axes:
        var.set_metadata('out_sharding', (LAYER_AXIS,) + tuple(axes))
  return module


def run(blocks: nnx.Module, x: jax.Array, call: Callable[[nnx.Module, jax.Array], jax.Array],
        *, remat: str) -> jax.Array:
  """Applies every block to x in order: `x = call(block, x)`.

  blocks: an nnx.List of blocks (unrolled) or one stacked module (`stack_modules`, scanned).
  call: (block, x) -> x of the same shape; closes over everything else (conditioning, layout).
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f'config.model.remat={remat!r} must be one of {list(REMAT_POLICIES)}')
  unrolled = isinstance(blocks, nnx.List)
  if remat == 'none' and unrolled:
    for block in blocks:
      x = call(block, x)
    return x
  graphdef = nnx.graphdef(blocks[0] if unrolled else blocks)

  def one(state, x):
    return call(nnx.merge(graphdef, state), x)
  if remat != 'none':
    # Inside a scan XLA cannot CSE the recomputation away, so prevent_cse is not needed there.
    one = jax.checkpoint(one, policy=REMAT_POLICIES[remat], prevent_cse=unrolled)
  if unrolled:
    for block in blocks:
      x = one(nnx.state(block), x)
    return x
  x, _ = jax.lax.scan(lambda x, state: (one(state, x), None), x, nnx.state(blocks))
  return x


# -- pure param dicts: the one conversion between layouts ---------------------------------------


def is_stacked(params: dict) -> bool:
  """Whether a pure params dict (or its flat-path form) holds the scanned layout."""
  blocks = params[BLOCKS]
  return not any(isinstance(k, int) or str(k).isdigit() for k in blocks)


def stack_params(params: dict) -> dict:
  """Unrolled pure params ({'blocks': {0: tree, 1: tree, ...}}) -> scanned ({'blocks': tree})."""
  blocks = params[BLOCKS]
  layers = [blocks[k] for k in sorted(blocks, key=int)]
  return {**params, BLOCKS: jax.tree.map(_stack, *layers)}


def unstack_params(params: dict) -> dict:
  """Scanned pure params -> unrolled, one entry per layer (integer keys, as nnx.List has)."""
  stacked = params[BLOCKS]
  depth = jax.tree.leaves(stacked)[0].shape[0]
  return {**params, BLOCKS: {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(depth)}}


def to_layout(params: dict, scanned: bool) -> dict:
  """Pure params in either layout -> the layout config.model.scan_blocks asks for."""
  if is_stacked(params) == scanned:
    return params
  return stack_params(params) if scanned else unstack_params(params)


def with_layout(config, scanned: bool):
  """A copy of `config` whose model uses the given layout (importers build the unrolled one)."""
  config = copy.deepcopy(config)
  config.model.scan_blocks = scanned
  return config


def abstract_to_layout(tree: dict, scanned: bool) -> dict:
  """`to_layout` on a tree of ShapeDtypeStructs (restore targets of the other layout)."""
  return jax.eval_shape(lambda t: to_layout(t, scanned), tree)


def flat_paths_stacked(paths, root: str = '') -> bool:
  """Whether flat checkpoint paths ('params/blocks/0/attn/...') hold the scanned layout."""
  prefix = f'{root}{BLOCKS}/'
  inside = [p[len(prefix):] for p in paths if p.startswith(prefix)]
  return bool(inside) and not any(p.split('/')[0].isdigit() for p in inside)


def layout_name(scanned: bool) -> str:
  return 'scanned (model.scan_blocks=True)' if scanned else 'unrolled (model.scan_blocks=False)'


def _stack(*xs):
  """Host arrays stay numpy (importers), device arrays stay on device."""
  return jnp.stack(xs) if isinstance(xs[0], jax.Array) else np.stack(xs)
