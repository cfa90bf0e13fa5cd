"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) as Flax NNX modules, NHWC, and its importer.

`AutoencoderKL(VAEConfig(), rngs=...)` is the `stabilityai/sd-vae-ft-ema` / `-mse` architecture;
`load_diffusers_vae(path)` builds it from a diffusers directory (`config.json` +
`diffusion_pytorch_model.safetensors` or `.bin`) or from a single weights file (diffusers key names, or
the original LDM names of `vae-ft-mse-840000-ema-pruned.safetensors`). The model latent is
`mean * scaling_factor` (or a posterior sample times it); the factor lives in `config.vae`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_WEIGHT_FILES = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin',
                 'diffusion_pytorch_model.fp16.safetensors', 'diffusion_pytorch_model.fp16.bin')


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of an AutoencoderKL; defaults are the SD VAE (8x downsampling, 4 latent channels)."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  scaling_factor: float = 0.18215  # informational; the pipeline uses config.vae.scaling_factor.
  dtype: str = 'float32'           # compute dtype; parameters are always float32.

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, cfg: Mapping[str, Any], **overrides) -> VAEConfig:
    """Builds the config from a diffusers `config.json` dict; rejects variants this model lacks."""
    if cfg.get('_class_name', 'AutoencoderKL') != 'AutoencoderKL':
      raise ValueError(f'config.json describes a {cfg["_class_name"]}, expected AutoencoderKL')
    n = len(cfg.get('block_out_channels', cls.block_out_channels))
    checks = {
        'down_block_types': ('DownEncoderBlock2D',) * n,
        'up_block_types': ('UpDecoderBlock2D',) * n,
        'act_fn': 'silu',
    }
    for key, want in checks.items():
      got = cfg.get(key, want)
      if (tuple(got) if isinstance(want, tuple) else got) != want:
        raise ValueError(f'config.json: {key}={got!r} is not supported (only {want!r})')
    if cfg.get('shift_factor') not in (None, 0, 0.0):
      raise ValueError(f'config.json: shift_factor={cfg["shift_factor"]} is not supported '
                       '(SD VAEs have none)')
    kwargs = {f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg}
    if 'block_out_channels' in kwargs:
      kwargs['block_out_channels'] = tuple(kwargs['block_out_channels'])
    if kwargs.get('scaling_factor') is None:
      kwargs.pop('scaling_factor', None)
    kwargs.update(overrides)
    return cls(**kwargs)


class ResnetBlock(nnx.Module):
  """GroupNorm-SiLU-conv twice plus a (1x1 conv if channels change) skip; diffusers ResnetBlock2D."""

  def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=jnp.dtype(cfg.dtype), rngs=rngs)
    norm = dict(num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps, use_fast_variance=False, **kw)
    self.norm1 = nnx.GroupNorm(cin, **norm)
    self.conv1 = nnx.Conv(cin, cout, (3, 3), padding=1, **kw)
    self.norm2 = nnx.GroupNorm(cout, **norm)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=1, **kw)
    self.conv_shortcut = nnx.Conv(cin, cout, (1, 1), **kw) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, cin) -> (B, H, W, cout)."""
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
    return skip + h


class Attention(nnx.Module):
  """Single-head spatial self-attention with a residual (the VAE mid-block attention)."""

  def __init__(self, channels: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=jnp.dtype(cfg.dtype), rngs=rngs)
    self.group_norm = nnx.GroupNorm(channels, num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps,
                                    use_fast_variance=False, **kw)
    self.to_q = nnx.Linear(channels, channels, **kw)
    self.to_k = nnx.Linear(channels, channels, **kw)
    self.to_v = nnx.Linear(channels, channels, **kw)
    self.to_out = nnx.Linear(channels, channels, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, H, W, C)."""
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, 1, c)  # (B, T, heads=1, C)
    o = jax.nn.dot_product_attention(self.to_q(t), self.to_k(t), self.to_v(t))
    return x + self.to_out(o.reshape(b, h, w, c))


class MidBlock(nnx.Module):
  """resnet -> attention -> resnet at the lowest resolution."""

  def __init__(self, channels: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(channels, channels, cfg, rngs=rngs) for _ in range(2)])
    self.attentions = nnx.List(
        [Attention(channels, cfg, rngs=rngs)] if cfg.mid_block_add_attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    for attn in self.attentions:
      x = attn(x)
    return self.resnets[1](x)


class Downsample(nnx.Module):
  """Stride-2 3x3 conv after zero padding (0, 1) on H and W (diffusers/LDM asymmetric padding)."""

  def __init__(self, channels: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(channels, channels, (3, 3), strides=2, padding=((0, 1), (0, 1)),
                         dtype=jnp.dtype(cfg.dtype), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, H/2, W/2, C)."""
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

  def __init__(self, channels: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(channels, channels, (3, 3), padding=1, dtype=jnp.dtype(cfg.dtype),
                         rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, 2H, 2W, C)."""
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownBlock(nnx.Module):
  def __init__(self, cin: int, cout: int, add_downsample: bool, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg, rngs=rngs)
                             for i in range(cfg.layers_per_block)])
    self.downsamplers = nnx.List([Downsample(cout, cfg, rngs=rngs)] if add_downsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in (*self.resnets, *self.downsamplers):
      x = layer(x)
    return x


class UpBlock(nnx.Module):
  def __init__(self, cin: int, cout: int, add_upsample: bool, cfg: VAEConfig, *, rngs: nnx.Rngs):
    # The decoder has one more resnet per level than the encoder (as in diffusers/LDM).
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg, rngs=rngs)
                             for i in range(cfg.layers_per_block + 1)])
    self.upsamplers = nnx.List([Upsample(cout, cfg, rngs=rngs)] if add_upsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in (*self.resnets, *self.upsamplers):
      x = layer(x)
    return x


def _norm_out(channels: int, cfg: VAEConfig, rngs: nnx.Rngs) -> nnx.GroupNorm:
  return nnx.GroupNorm(channels, num_groups=cfg.norm_num_groups, epsilon=cfg.norm_eps,
                       use_fast_variance=False, dtype=jnp.dtype(cfg.dtype), rngs=rngs)


class Encoder(nnx.Module):
  """Image (B, H, W, in) -> moments (B, H/f, W/f, 2 * latent) before quant_conv."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    ch = cfg.block_out_channels
    dt = jnp.dtype(cfg.dtype)
    self.conv_in = nnx.Conv(cfg.in_channels, ch[0], (3, 3), padding=1, dtype=dt, rngs=rngs)
    self.down_blocks = nnx.List([
        DownBlock(ch[max(i - 1, 0)], ch[i], i < len(ch) - 1, cfg, rngs=rngs)
        for i in range(len(ch))])
    self.mid_block = MidBlock(ch[-1], cfg, rngs=rngs)
    self.conv_norm_out = _norm_out(ch[-1], cfg, rngs)
    self.conv_out = nnx.Conv(ch[-1], 2 * cfg.latent_channels, (3, 3), padding=1, dtype=dt,
                             rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latent (B, h, w, latent) -> image (B, h*f, w*f, out) after post_quant_conv."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    ch = tuple(reversed(cfg.block_out_channels))
    dt = jnp.dtype(cfg.dtype)
    self.conv_in = nnx.Conv(cfg.latent_channels, ch[0], (3, 3), padding=1, dtype=dt, rngs=rngs)
    self.mid_block = MidBlock(ch[0], cfg, rngs=rngs)
    self.up_blocks = nnx.List([
        UpBlock(ch[max(i - 1, 0)], ch[i], i < len(ch) - 1, cfg, rngs=rngs)
        for i in range(len(ch))])
    self.conv_norm_out = _norm_out(ch[-1], cfg, rngs)
    self.conv_out = nnx.Conv(ch[-1], cfg.out_channels, (3, 3), padding=1, dtype=dt, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """The KL autoencoder: `encode` gives posterior moments, `decode` maps (unscaled) latents back."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt = jnp.dtype(cfg.dtype)
    two_c, c = 2 * cfg.latent_channels, cfg.latent_channels
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.quant_conv = (nnx.Conv(two_c, two_c, (1, 1), dtype=dt, rngs=rngs)
                       if cfg.use_quant_conv else None)
    self.post_quant_conv = (nnx.Conv(c, c, (1, 1), dtype=dt, rngs=rngs)
                            if cfg.use_post_quant_conv else None)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: (B, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, H/8, W/8, 4), float32, unscaled."""
    m = self.encoder(x)
    if self.quant_conv is not None:
      m = self.quant_conv(m)
    mean, logvar = jnp.split(m.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)  # diffusers DiagonalGaussianDistribution clamp.

  def decode(self, z: jax.Array) -> jax.Array:
    """z: (B, h, w, 4) unscaled latent (model latent / scaling_factor) -> (B, 8h, 8w, 3), ~[-1, 1]."""
    z = z.astype(jnp.dtype(self.cfg.dtype))
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)


def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
  """A draw mean + exp(logvar / 2) * eps from the diagonal Gaussian posterior; same shape."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


# ---------------------------------------------------------------------------------------------------
# Importer: PyTorch state dict (diffusers or LDM names) -> NNX state.

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


def _read_state_dict(file: str) -> dict[str, np.ndarray]:
  """Reads a .safetensors or a torch .bin/.ckpt/.pt file into float32 numpy arrays."""
  if file.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    sd = load_file(file)
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f'reading {file} needs PyTorch (pip install torch); '
                        'or convert it to .safetensors') from e
    sd = torch.load(file, map_location='cpu', weights_only=True)
    sd = sd.get('state_dict', sd)
    sd = {k: v.float().numpy() for k, v in sd.items() if hasattr(v, 'numpy')}
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


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
    ValueError: listing missing, unexpected and shape-mismatched keys if the file does not fit.
  """
  file, raw_cfg = _resolve_files(path)
  cfg = VAEConfig.from_diffusers(raw_cfg, dtype=dtype)
  sd = _read_state_dict(file)
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
    raise ValueError(
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
