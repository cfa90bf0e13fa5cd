"""Device mesh, logical-axis rules and the shardings of params, optimizer state and batches.

The mesh has three `AxisType.Auto` axes: `data` (pure data parallel), `fsdp` (data parallel with
parameters and optimizer state sharded) and `tensor` (heads / MLP width). Model code only names
logical axes (dit.py); `RULES` maps them to mesh axes. A dimension that a mesh axis does not
divide stays replicated along it, so tiny test models shard wherever they can.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# logical axis -> mesh axis (params and activations).
RULES = (
    ('batch', BATCH_AXES),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', None),
)


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all); a -1 size takes the rest."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh {dict(zip(AXES, sizes))}: at most one axis may be -1')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'config.mesh {dict(zip(AXES, sizes))} does not divide '
                       f'{len(devices)} devices')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f'config.mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, '
                     f'but {len(devices)} are available; make data * fsdp * tensor equal the '
                     'device count, or set one axis to -1 (all remaining devices)')
  return jax.make_mesh(tuple(sizes), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def _mesh_axes(logical_axes) -> tuple:
  rules = dict(RULES)
  return tuple(rules.get(a) if a is not None else None for a in logical_axes)


def _fit(spec: tuple, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
  """Drops mesh axes that do not divide their dimension (they stay replicated)."""
  fitted = []
  for dim, axes in zip(shape, spec + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
  """Activation sharding hint by logical axis names under the ambient mesh (`jax.set_mesh`).

  A no-op without a mesh, or where a mesh axis is missing, manual, or does not divide its
  dimension (a partial constraint would force replication there instead).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = _mesh_axes(logical_axes)
  names = {n for axes in spec if axes for n in ((axes,) if isinstance(axes, str) else axes)}
  if not names <= set(mesh.axis_names) - set(mesh.manual_axes):
    return x
  fitted = _fit(spec, x.shape, mesh)
  if tuple(fitted) != spec + (None,) * (x.ndim - len(spec)):
    return x
  return jax.lax.with_sharding_constraint(x, fitted)


def param_shardings(mesh: jax.sharding.Mesh, abstract_state: nnx.State):
  """NamedShardings for an (abstract) model state from its logical axis metadata."""
  def one(var):
    axes = var.get_metadata().get('out_sharding') or ()
    return NamedSharding(mesh, _fit(_mesh_axes(axes), var.value.shape, mesh))
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def opt_state_shardings(tx, abstract_opt_state, params_sharding, mesh: jax.sharding.Mesh):
  """Optimizer-state leaves that mirror a parameter (Adam's mu, nu) take its sharding."""
  return optax.tree_map_params(tx, lambda _, s: s, abstract_opt_state, params_sharding,
                               transform_non_params=lambda _: replicated(mesh))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh: jax.sharding.Mesh) -> int:
  """How many ways the batch axis is split (data x fsdp)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
