"""Importing pretrained PyTorch weights: SiT, DiT and official PPFlow into `PPFModel` params
(here), the SD VAE (`convert/vae.py`) and the FID Inception (`convert/inception.py`).

Every file is read by one safe reader (`torch_io.read_state_dict`: `torch.load(weights_only=True)`
or safetensors) and every importer raises the same errors: `UnsafeCheckpointError` for a pickle
that needs code, `CheckpointMismatchError` for names or shapes that do not fit the config.

- `load_torch_checkpoint(path, config)`: a .pt/.pth/.bin/.ckpt/.safetensors file whose layout
  matches the config (SiT/DiT -> one stage; official PPF-XL-2/3 -> the same 2/3 stages) -> params.
- `init_from_sit(path_or_params, config)`: a multi-stage PPF initialised from SiT (paper §3.3).
- `params_for_init(path, config)`: what `--config.train.init_from=FILE` means for a weight file.

Params are pure dicts (`nnx.to_pure_dict` layout) of numpy arrays in config.model.param_dtype.
They are stored in the one params-only format, `checkpoint.save_params` (with the model fields
that `checkpoint.load_params` checks); `python -m ppflow_jax.convert` writes it.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ppflow_jax.convert import sit as sit_lib
from ppflow_jax.convert import torch_io
from ppflow_jax.convert.init_from_sit import expand_sit_params
from ppflow_jax.convert.init_from_sit import init_from_sit
from ppflow_jax.convert.init_from_sit import sit_params_from_state
from ppflow_jax.convert.torch_io import CheckpointMismatchError
from ppflow_jax.convert.torch_io import UnsafeCheckpointError

__all__ = ['CheckpointMismatchError', 'UnsafeCheckpointError', 'init_from_sit', 'load_model',
           'load_torch_checkpoint', 'params_for_init']


def load_torch_checkpoint(path: str | os.PathLike, config: ml_collections.ConfigDict) -> dict:
  """Params of `PPFModel(config)` from a SiT/DiT/official-PPFlow weight file of the same layout."""
  path = os.fspath(path)
  return sit_lib.convert_state_dict(torch_io.read_state_dict(path), config, source=path)


def load_model(path: str | os.PathLike, config: ml_collections.ConfigDict) -> nnx.Module:
  """`PPFModel(config)` holding the weights of a SiT/DiT/official-PPFlow file."""
  graphdef, _ = nnx.split(sit_lib.abstract_model(config))
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, load_torch_checkpoint(path, config)))


def params_for_init(path: str | os.PathLike, config: ml_collections.ConfigDict, *,
                    seed: int | None = None) -> dict:
  """Initial params for training from a SiT/DiT/PPFlow weight file (`config.train.init_from`;
  a directory of converted params is `checkpoint.load_init_params`'s other case).

  A SiT/DiT file with a multi-stage config: `init_from_sit` (seed: for the fresh level
  embedding, default config.seed). Any other file: a direct load, which must match the config.
  """
  path = os.fspath(path)
  state = torch_io.read_state_dict(path)
  if sit_lib.detect_layout(state).kind == 'sit' and len(config.schedule.patch_sizes) > 1:
    return expand_sit_params(sit_params_from_state(state, config, source=path), config, seed=seed)
  return sit_lib.convert_state_dict(state, config, source=path)
