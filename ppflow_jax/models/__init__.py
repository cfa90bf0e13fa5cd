"""Model constructors: `build_model(config, rngs)` picks the variant named by config.model.variant;
`abstract_params(config, mesh)` gives its graph and parameter shapes (and shardings) without
computing anything."""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from ppflow_jax import sharding
from ppflow_jax.models.ppf import PPFModel


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  """The velocity network of `config` (resolved by config_lib.resolve)."""
  if config.model.variant == 'ppf':
    return PPFModel(config, rngs=rngs)
  if config.model.variant == 'mpdit':
    from ppflow_jax.models.mpdit import MPDiT  # pylint: disable=g-import-not-at-top
    return MPDiT(config, rngs=rngs)
  raise ValueError(f'unknown config.model.variant={config.model.variant!r}')


def abstract_params(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
                    ) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, params) of `config`'s model, params a pure dict (`nnx.to_pure_dict` layout) of
  `jax.ShapeDtypeStruct`s that carry the parameter shardings on `mesh` when one is given."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))))
  params = nnx.to_pure_dict(state)
  if mesh is None:
    return graphdef, params
  rules = sharding.rules_from_config(config)
  shardings = nnx.to_pure_dict(sharding.param_shardings(mesh, state, rules))
  return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                params, shardings)
