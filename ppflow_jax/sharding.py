"""Device mesh, logical-axis rules and the shardings of params, optimizer state and batches.

The mesh has three `AxisType.Auto` axes: `data` (pure data parallel), `fsdp` (data parallel with
parameters and optimizer state sharded) and `tensor` (heads / MLP width). Model code only names
logical axes (dit.py); rules map them to mesh axes, MaxText-style: `RULES` by default, or
`config.mesh.rules` (`rules_from_config`), e.g. `('mlp', None)` to keep MLP weights whole or
`('embed', ('fsdp', 'tensor'))` to shard them wider, without editing code. Parameter shardings use
the rules directly; activation constraints (`constrain`) read the rules active in `axis_rules`
(the train step traces under the config's). The data batch itself is always split over
data x fsdp. A dimension that a mesh axis does not divide stays replicated along it, so tiny test
models shard wherever they can.
"""

from __future__ import annotations

import contextlib
import contextvars

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
    ('layers', None),   # the stacked (depth,) axis of scanned blocks (models/block_stack.py).
)
_ACTIVE_RULES = contextvars.ContextVar('ppflow_axis_rules', default=RULES)


def rules_from_config(config: ml_collections.ConfigDict) -> tuple:
  """config.mesh.rules as ((logical, mesh axes | None), ...); one clear error if malformed."""
  rules = tuple(config.mesh.rules)
  for rule in rules:
    ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
    axes = () if not ok or rule[1] is None else (
        (rule[1],) if isinstance(rule[1], str) else tuple(rule[1]))
    if not ok or not set(axes) <= set(AXES):
      raise ValueError(f'config.mesh.rules entry {rule!r} must be (logical_name, mesh axis or '
                       f'tuple of mesh axes or None) with mesh axes from {AXES}')
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


@contextlib.contextmanager
def axis_rules(rules: tuple):
  """Makes `rules` the ones `constrain` uses while tracing inside this block."""
  token = _ACTIVE_RULES.set(tuple(rules))
  try:
    yield
  finally:
    _ACTIVE_RULES.reset(token)


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
  slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if slices > 1:  # multi-slice: the data axis spans slices (DCN), fsdp and tensor stay inside one.
    if sizes[0] % slices:
      raise ValueError(f'config.mesh.data={sizes[0]} must be a multiple of the {slices} slices '
                       '(data parallelism spans slices)')
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_hybrid_device_mesh(
        (sizes[0] // slices, sizes[1], sizes[2]), (slices, 1, 1), devices)
    return jax.sharding.Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  return jax.make_mesh(tuple(sizes), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def _mesh_axes(logical_axes, rules: tuple | None = None) -> tuple:
  rules = dict(_ACTIVE_RULES.get() if rules is None else rules)
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


def param_shardings(mesh: jax.sharding.Mesh, abstract_state: nnx.State, rules: tuple = RULES):
  """NamedShardings for an (abstract) model state from its logical axis metadata."""
  def one(var):
    axes = var.get_metadata().get('out_sharding') or ()
    return NamedSharding(mesh, _fit(_mesh_axes(axes, rules), var.value.shape, mesh))
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
