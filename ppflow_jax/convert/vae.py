"""Importer of diffusers / original-LDM VAE weights into `models.vae.AutoencoderKL`.

`load_diffusers_vae(path)` builds the model from a diffusers directory (`config.json` +
`diffusion_pytorch_model.safetensors` or `.bin`) or from a single weights file (diffusers key
names, or the original LDM names of `vae-ft-mse-840000-ema-pruned.safetensors`), read by the one
safe reader (`torch_io.read_state_dict`); `for_config(config)` is the VAE of config.vae.path.
"""

from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppflow_jax.convert import torch_io
from ppflow_jax.models.vae import AutoencoderKL
from ppflow_jax.models.vae import VAEConfig

_WEIGHT_FILES = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin',
                 'diffusion_pytorch_model.fp16.safetensors', 'diffusion_pytorch_model.fp16.bin')



def _flax_path_to_torch_key(path: tuple) -> str:
  """('encoder', 'down_blocks', 0, ..., 'kernel') -> 'encoder.down_blocks.0....weight'."""
  *mods, leaf = (str(p) for p in path)
  mods = ['to_out.0' if m == 'to_out' else m for m in mods]
  return '.'.join(mods + ['weight' if leaf in ('kernel', 'scale') else leaf])


_OLD_ATTN = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}
_LDM_ATTN = {'norm': 'group_norm', 'q': 'to_q', 'k': 'to_k', 'v': 'to_v', 'proj_out': 'to_out.0'}


def _canonical_key(key: str, num_levels: int) -> str:
  """Maps old-diffusers and original LDM (CompVis) VAE key names to current diffusers names."""
  key = key.removeprefix('first_stage_model.')  # full SD checkpoints nest the VAE here.
  key = re.sub(r'attentions\.0\.(query|key|value|proj_attn)\.',
               lambda m: f'attentions.0.{_OLD_ATTN[m[1]]}.', key)
  # LDM names: encoder.down.{i}.block.{j}, decoder.up.{n-1-i}, mid.block_1/attn_1, norm_out.
  key = re.sub(r'^encoder\.down\.(\d+)\.block\.', r'encoder.down_blocks.\1.resnets.', key)
  key = re.sub(r'^encoder\.down\.(\d+)\.downsample\.', r'encoder.down_blocks.\1.downsamplers.0.', key)
  key = re.sub(r'^decoder\.up\.(\d+)\.(block|upsample)\.',
               lambda m: (f'decoder.up_blocks.{num_levels - 1 - int(m[1])}.'
                          + ('resnets.' if m[2] == 'block' else 'upsamplers.0.')), key)
  key = re.sub(r'\.mid\.block_(\d)\.', lambda m: f'.mid_block.resnets.{int(m[1]) - 1}.', key)
  key = re.sub(r'\.mid\.attn_1\.(norm|q|k|v|proj_out)\.',
               lambda m: f'.mid_block.attentions.0.{_LDM_ATTN[m[1]]}.', key)
  key = re.sub(r'^(encoder|decoder)\.norm_out\.', r'\1.conv_norm_out.', key)
  return key.replace('.nin_shortcut.', '.conv_shortcut.')


def _to_flax(key: str, w: np.ndarray, leaf: str) -> np.ndarray:
  """Converts one torch tensor to the layout of the NNX leaf (conv OIHW -> HWIO, linear OI -> IO)."""
  if leaf != 'kernel':
    return w
  if '.to_' in key:  # attention projections: Linear (O, I), or a 1x1 conv (O, I, 1, 1) in LDM.
    return w.reshape(w.shape[0], w.shape[1]).T
  return w.transpose(2, 3, 1, 0)


def _resolve_files(path: str) -> tuple[str, dict]:
  """Finds the weights file and config dict (empty for a single file) for `path`."""
  if os.path.isdir(path):
    cfg_file = os.path.join(path, 'config.json')
    if not os.path.exists(cfg_file):
      raise FileNotFoundError(f'{path} has no config.json; pass a diffusers AutoencoderKL '
                              'directory (e.g. a download of stabilityai/sd-vae-ft-ema)')
    with open(cfg_file) as f:
      cfg = json.load(f)
    for name in _WEIGHT_FILES:
      if os.path.exists(os.path.join(path, name)):
        return os.path.join(path, name), cfg
    raise FileNotFoundError(f'{path} has none of {list(_WEIGHT_FILES)}')
  if not os.path.exists(path):
    raise FileNotFoundError(f'VAE weights not found: {path!r} (config.vae.path)')
  return path, {}


def read_vae_config(path: str) -> VAEConfig:
  """The VAEConfig of a diffusers directory (its config.json) or of a single file (the SD VAE)."""
  return VAEConfig.from_diffusers(_resolve_files(path)[1])


def load_diffusers_vae(path: str, *, dtype: str = 'float32') -> AutoencoderKL:
  """Builds an AutoencoderKL from diffusers-format weights.

  Args:
    path: a diffusers directory (config.json + diffusion_pytorch_model.{safetensors,bin}), or a single
      .safetensors/.bin/.ckpt file with diffusers or LDM key names (then the SD VAE config is used).
    dtype: compute dtype ('float32' or 'bfloat16'); parameters are float32.

  Raises:
    CheckpointMismatchError: listing missing, unexpected and shape-mismatched keys if the file
      does not fit.
  """
  file, raw_cfg = _resolve_files(path)
  cfg = VAEConfig.from_diffusers(raw_cfg, dtype=dtype)
  sd = {k: np.asarray(v, np.float32) for k, v in torch_io.read_state_dict(file).items()}
  n = len(cfg.block_out_channels)
  sd = {_canonical_key(k, n): v for k, v in sd.items()}
  # Full SD / LDM checkpoints also hold UNet, text encoder or loss weights: keep the VAE's.
  sd = {k: v for k, v in sd.items()
        if k.split('.')[0] in ('encoder', 'decoder', 'quant_conv', 'post_quant_conv')}

  abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  expected = {_flax_path_to_torch_key(p): p for p in flat}
  missing = sorted(set(expected) - set(sd))
  unexpected = sorted(set(sd) - set(expected))
  converted, mismatched = {}, []
  for key, p in expected.items():
    if key not in sd:
      continue
    w = _to_flax(key, sd[key], str(p[-1]))
    want = flat[p].get_value().shape
    if w.shape != want:
      mismatched.append(f'{key}: file {sd[key].shape} -> {w.shape}, model {want}')
    converted[p] = w
  if missing or unexpected or mismatched:
    def fmt(items):
      return ', '.join(items[:20]) + (f' ... (+{len(items) - 20})' if len(items) > 20 else '')
    raise torch_io.CheckpointMismatchError(
        f'VAE weights {file} do not match the AutoencoderKL built from its config ({cfg}):\n'
        f'  missing ({len(missing)}): {fmt(missing)}\n'
        f'  unexpected ({len(unexpected)}): {fmt(unexpected)}\n'
        f'  shape mismatch ({len(mismatched)}): {fmt(mismatched)}')
  for p, w in converted.items():
    flat[p].set_value(jnp.asarray(w))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def for_config(config) -> AutoencoderKL | None:
  """The VAE of config.vae.path, or None when the model works on images directly."""
  if not config.vae.path:
    return None
  from ppflow_jax import weights  # pylint: disable=g-import-not-at-top
  return load_diffusers_vae(weights.resolve(config.vae.path))  # resolves hf:<repo id>
