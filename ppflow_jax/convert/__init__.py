"""Importing pretrained PyTorch weights (SiT, DiT, official PPFlow) into `PPFModel` params.

- `load_torch_checkpoint(path, config)`: a .pt/.pth/.bin/.safetensors file whose layout matches
  the config (SiT/DiT -> one stage; official PPF-XL-2/3 -> the same 2/3 stages) -> params.
- `init_from_sit(path_or_params, config)`: a multi-stage PPF initialised from SiT (paper §3.3).
- `params_for_init(path, config)`: what `--config.train.init_from=PATH` means (a file or a
  workdir written by `python -m ppflow_jax.convert`).
- `save_params` / `restore_params`: the params-only orbax checkpoint the CLI writes.

Params are pure dicts (`nnx.to_pure_dict` layout) of numpy arrays in config.model.param_dtype.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from ppflow_jax.convert import sit as sit_lib
from ppflow_jax.convert import torch_io
from ppflow_jax.convert.init_from_sit import expand_sit_params
from ppflow_jax.convert.init_from_sit import init_from_sit
from ppflow_jax.convert.init_from_sit import sit_params_from_state
from ppflow_jax.convert.sit import CheckpointMismatchError
from ppflow_jax.convert.torch_io import UnsafeCheckpointError
from ppflow_jax.models import block_stack

PARAMS_DIR = 'converted_params'

__all__ = ['CheckpointMismatchError', 'UnsafeCheckpointError', 'init_from_sit', 'load_model',
           'load_torch_checkpoint', 'params_for_init', 'restore_params', 'save_params']


def load_torch_checkpoint(path: str | os.PathLike, config: ml_collections.ConfigDict) -> dict:
  """Params of `PPFModel(config)` from a SiT/DiT/official-PPFlow weight file of the same layout."""
  path = os.fspath(path)
  return sit_lib.convert_state_dict(torch_io.read_state_dict(path), config, source=path)


def load_model(path: str | os.PathLike, config: ml_collections.ConfigDict) -> nnx.Module:
  """`PPFModel(config)` holding the weights of a SiT/DiT/official-PPFlow file."""
  graphdef, _ = nnx.split(sit_lib.abstract_model(config))
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, load_torch_checkpoint(path, config)))


def save_params(params: dict, workdir: str) -> str:
  """Writes params-only orbax checkpoint `workdir/converted_params`; returns its path."""
  path = os.path.abspath(os.path.join(workdir, PARAMS_DIR))
  if os.path.exists(path):
    raise FileExistsError(f'{path} exists; remove it or pick another --workdir')
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, params)
  return path


def restore_params(path: str, config: ml_collections.ConfigDict) -> dict:
  """Params saved by `save_params` (`path`: the workdir or its converted_params dir), in the
  block layout of `config` whichever layout they were saved in."""
  from ppflow_jax.checkpoint import flat_paths  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, PARAMS_DIR)):
    path = os.path.join(path, PARAMS_DIR)
  abstract = nnx.to_pure_dict(nnx.state(sit_lib.abstract_model(config)))
  with ocp.StandardCheckpointer() as ckpt:
    try:
      saved_stacked = block_stack.flat_paths_stacked(flat_paths(ckpt.metadata(path).item_metadata))
      params = ckpt.restore(path, block_stack.abstract_to_layout(abstract, saved_stacked))
      return block_stack.to_layout(params, config.model.scan_blocks)
    except (ValueError, KeyError, FileNotFoundError) as e:
      why = str(e).split(' Metadata keys')[0]  # orbax appends every stored key: too long.
      raise ValueError(f'{path} is not converted params of the model of this config (convert '
                       f'again with the same --config): {why}') from e


def params_for_init(path: str | os.PathLike, config: ml_collections.ConfigDict, *,
                    seed: int | None = None) -> dict:
  """Initial params for training from `path` (what `config.train.init_from` names).

  A directory: params written by the converter CLI. A SiT/DiT file with a multi-stage config:
  `init_from_sit` (seed: for the fresh level embedding, default config.seed). Any other file:
  a direct load, which must match the config's layout.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    return restore_params(path, config)
  state = torch_io.read_state_dict(path)
  if sit_lib.detect_layout(state).kind == 'sit' and len(config.schedule.patch_sizes) > 1:
    return expand_sit_params(sit_params_from_state(state, config, source=path), config, seed=seed)
  return sit_lib.convert_state_dict(state, config, source=path)
