"""The one reader of PyTorch (`.pt`/`.pth`/`.bin`/`.ckpt`) and `.safetensors` weight files, and
the errors of every importer (SiT/DiT/PPFlow, VAE, Inception) and of params restores.

A pickle can run arbitrary code when it is loaded, so `.pt` files go through
`torch.load(weights_only=True)` only: tensors, containers and a few allow-listed plain classes are
rebuilt, anything else is refused with `UnsafeCheckpointError`. `.safetensors` files hold no code
and are read with `safetensors.numpy`, without PyTorch. Weights whose names or shapes do not fit
the model being built raise `CheckpointMismatchError`, listing every problem at once.

A file that cannot be read is told apart before any unpickling: `EmptyWeightFileError` (0 bytes),
`TruncatedWeightFileError` (cut short: a zip without its directory, a pickle or safetensors
payload that ends early), `CorruptWeightFileError` (not a weight file at all, e.g. an HTML page
saved by a download link, or a zip member failing its CRC). All are `WeightFileError`s, user
errors that the command-line tools print as one line.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import struct
import zipfile

import numpy as np

from ppflow_jax import errors
from ppflow_jax import weights

TORCH_SUFFIXES = ('.pt', '.pth', '.bin', '.ckpt')
WEIGHT_SUFFIXES = TORCH_SUFFIXES + ('.safetensors',)   # every file `read_state_dict` reads
# Containers written by training scripts (SiT/DiT train.py: {'model', 'ema', 'opt', 'args'});
# the EMA weights are the ones that were evaluated, so they win.
_CONTAINER_KEYS = ('ema', 'model', 'state_dict')


class WeightFileError(errors.UserError, ValueError):
  """A weight file that cannot be read; the message names the file and what to do."""


class EmptyWeightFileError(WeightFileError):
  """The file has 0 bytes."""


class TruncatedWeightFileError(WeightFileError):
  """The file ends before its own structure says it should (an interrupted download or copy)."""


class CorruptWeightFileError(WeightFileError):
  """The file is not a PyTorch/safetensors weight file, or its bytes fail a checksum."""


class UnsafeCheckpointError(WeightFileError):
  """The file's pickle needs code that `torch.load(weights_only=True)` refuses to run."""


class CheckpointMismatchError(ValueError):
  """Weights whose names, tree or shapes differ from the model the config builds (all listed)."""


_ZIP_MAGIC = b'PK\x03\x04'
_PICKLE_MAGIC = b'\x80'  # PROTO opcode: torch's legacy (pre-1.6) non-zip format starts with it.
_REDOWNLOAD = 'download or copy it again'


def _check_torch_file(path: str) -> None:
  """Raises the Empty/Truncated/Corrupt error that fits `path`, or returns if it looks whole.

  A zip (torch >= 1.6) is checked member by member against its CRCs, which torch.load skips.
  """
  size = os.path.getsize(path)
  if size == 0:
    raise EmptyWeightFileError(f'{path} is empty (0 bytes); {_REDOWNLOAD}')
  with open(path, 'rb') as f:
    head = f.read(64)
  if head.startswith(_ZIP_MAGIC):
    if not zipfile.is_zipfile(path):
      raise TruncatedWeightFileError(
          f'{path} is truncated: a PyTorch zip of {size} bytes without its closing directory '
          f'(an interrupted download or copy); {_REDOWNLOAD}')
    try:
      with zipfile.ZipFile(path) as z:
        bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise TruncatedWeightFileError(f'{path} is truncated or damaged ({e}); {_REDOWNLOAD}') from e
    if bad is not None:
      raise CorruptWeightFileError(f'{path} is corrupt: its entry {bad!r} fails its CRC check; '
                                   f'{_REDOWNLOAD}')
  elif not head.startswith(_PICKLE_MAGIC):
    what = ('an HTML/text page, not weights (a download link that returned a web page?)'
            if head.lstrip()[:1] in (b'<', b'{') else f'unknown bytes {head[:8]!r}')
    raise CorruptWeightFileError(f'{path} is not a PyTorch weight file: it starts with {what}; '
                                 'expected a torch.save zip or pickle, or use a .safetensors file')


def _check_safetensors_file(path: str) -> None:
  """Raises Empty/Truncated/Corrupt errors for a .safetensors file whose header or size is off."""
  size = os.path.getsize(path)
  if size == 0:
    raise EmptyWeightFileError(f'{path} is empty (0 bytes); {_REDOWNLOAD}')
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise TruncatedWeightFileError(f'{path} is truncated ({size} bytes, shorter than the '
                                     f'safetensors header length); {_REDOWNLOAD}')
    (header_len,) = struct.unpack('<Q', head)
    if header_len > size - 8:
      if header_len > 100_000_000:  # no real header is this long: not a safetensors file
        raise CorruptWeightFileError(f'{path} is not a safetensors file (header length '
                                     f'{header_len}); {_REDOWNLOAD}')
      raise TruncatedWeightFileError(f'{path} is truncated: its header needs {header_len} bytes '
                                     f'but the file has {size}; {_REDOWNLOAD}')
    try:
      header = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError) as e:
      raise CorruptWeightFileError(f'{path} is corrupt: its safetensors header is not JSON '
                                   f'({e}); {_REDOWNLOAD}') from e
  ends = [v['data_offsets'][1] for k, v in header.items()
          if k != '__metadata__' and isinstance(v, dict) and 'data_offsets' in v]
  need = 8 + header_len + max(ends, default=0)
  if need > size:
    raise TruncatedWeightFileError(f'{path} is truncated: its tensors need {need} bytes but the '
                                   f'file has {size}; {_REDOWNLOAD}')


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
    except EOFError as e:
      raise TruncatedWeightFileError(f'{path} is truncated: its pickle ends early; '
                                     f'{_REDOWNLOAD}') from e
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
  weights.require_local(path)
  if not os.path.isfile(path):
    raise errors.UserFileError(f'no weight file at {path}' + (
        ' (it is a directory)' if os.path.isdir(path) else '') + '; check the path')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    _check_safetensors_file(path)
    raw = load_file(path)
  elif path.endswith(TORCH_SUFFIXES):
    _check_torch_file(path)
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
