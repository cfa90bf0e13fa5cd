"""Model constructors: `build_model(config, rngs)` picks the variant named by config.model.variant."""

from __future__ import annotations

import ml_collections
from flax import nnx

from ppflow_jax.models.ppf import PPFModel


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  """The velocity network of `config` (resolved by config_lib.resolve)."""
  if config.model.variant == 'ppf':
    return PPFModel(config, rngs=rngs)
  if config.model.variant == 'mpdit':
    from ppflow_jax.models.mpdit import MPDiT  # pylint: disable=g-import-not-at-top
    return MPDiT(config, rngs=rngs)
  raise ValueError(f'unknown config.model.variant={config.model.variant!r}')
