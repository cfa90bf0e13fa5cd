"""The one reader of PyTorch (`.pt`/`.pth`/`.bin`/`.ckpt`) and `.safetensors` weight files, and
the errors of every importer (SiT/DiT/PPFlow, VAE, Inception) and of params restores.

A pickle can run arbitrary code when it is loaded, so `.pt` files go through
`torch.load(weights_only=True)` only: tensors, containers and a few allow-listed plain classes are
rebuilt, anything else is refused with `UnsafeCheckpointError`. `.safetensors` files hold no code
and are read with `safetensors.numpy`, without PyTorch. Weights whose names or shapes do not fit
the model being built raise `CheckpointMismatchError`, listing every problem at once.
"""

from __future__ import annotations

import argparse
import os
import pickle

import numpy as np

TORCH_SUFFIXES = ('.pt', '.pth', '.bin', '.ckpt')
WEIGHT_SUFFIXES = TORCH_SUFFIXES + ('.safetensors',)   # every file `read_state_dict` reads
# Containers written by training scripts (SiT/DiT train.py: {'model', 'ema', 'opt', 'args'});
# the EMA weights are the ones that were evaluated, so they win.
_CONTAINER_KEYS = ('ema', 'model', 'state_dict')


class UnsafeCheckpointError(ValueError):
  """The file's pickle needs code that `torch.load(weights_only=True)` refuses to run."""


class CheckpointMismatchError(ValueError):
  """Weights whose names, tree or shapes differ from the model the config builds (all listed)."""


def _load_torch(path: str) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'reading {path} needs PyTorch (pip install torch); or convert the file '
                      'to .safetensors, which is read without it') from e
  # SiT/DiT training checkpoints store their argparse options next to the weights; a Namespace
  # only receives attributes when unpickled, so allowing it runs no code.
  with torch.serialization.safe_globals([argparse.Namespace]):
    try:
      obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
      # Keep torch's reason (e.g. 'unsupported GLOBAL posix.system'), not its generic advice.
      why = '; '.join(l.strip() for l in str(e).splitlines()[1:] if l.strip() and not
                      l.startswith(('Please file an issue', 'Check the documentation')))
      raise UnsafeCheckpointError(
          f'refusing to load {path}: torch.load(weights_only=True) refused its pickle, which '
          'references code rather than only tensors, so loading it could execute that code. '
          'If you trust the file, re-save just its state dict (torch.save(model.state_dict())) '
          f'or convert it to .safetensors. ({why or e})') from e
  return obj


def _pick_state_dict(obj, path: str) -> dict:
  """The flat name -> tensor mapping inside a loaded file (EMA preferred)."""
  if not isinstance(obj, dict):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state dict (a dict of tensors)')
  for key in _CONTAINER_KEYS:
    if isinstance(obj.get(key), dict):
      return obj[key]
  return obj


def _to_numpy(value, name: str, path: str) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, 'detach'):  # a torch tensor; bf16/fp16 have no exact numpy twin -> float32.
    value = value.detach()
    return (value.float() if value.is_floating_point() else value).numpy()
  raise ValueError(f'{path}: entry {name!r} is a {type(value).__name__}, not a tensor; pass a '
                   'state dict or a checkpoint with an "ema" or "model" state dict')


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a weight file into {torch parameter name: numpy array}.

  Accepts a flat state dict or a dict with an `ema` (preferred), `model` or `state_dict` entry;
  strips the `module.` prefix of DistributedDataParallel/DataParallel-wrapped models.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no checkpoint file at {path}')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    raw = load_file(path)
  elif path.endswith(TORCH_SUFFIXES):
    raw = _pick_state_dict(_load_torch(path), path)
  else:
    raise ValueError(f'{path}: unknown weight file type; expected .safetensors or one of '
                     f'{", ".join(TORCH_SUFFIXES)}')
  state = {}
  for name, value in raw.items():
    key = name
    while key.startswith('module.'):
      key = key[len('module.'):]
    state[key] = _to_numpy(value, name, path)
  if not state:
    raise ValueError(f'{path} holds no tensors')
  return state
