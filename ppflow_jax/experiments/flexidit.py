"""FlexiDiT (Anagnostidis et al. 2025) pieces on top of the PPF model: the weak/powerful inference
scheduler as a stage boundary, and PI-resize initialisation of a new patch size's projections.

- Scheduler (FlexiDiT §3.3): the first T_weak sampling steps use the weak (large) patch, the rest
  the powerful one. In this framework that is a two-stage schedule whose boundary sits between
  grid points T_weak - 1 and T_weak (`weak_step_boundary`, `set_weak_steps`).
- Weak-model guidance (§3.4) and packing of its two passes (appendix B.2) live in the sampler:
  `config.sample.guidance = 'weak_conditional'` (sampling.py).
- PI-resize (FlexiViT, used by FlexiDiT §3.1): a patch embedding w for patch p is mapped to
  patch p' >= p by w' = pinv(B^T) w per channel, where B is the bilinear resize p -> p'
  (p'^2 x p^2). Then <B x, w'> = <x, w> for every patch x: a patch-upsampled input gets exactly
  the original embedding. De-embeddings get w' = B w (the new output patch is the bilinear
  upsampling of the old one, and pinv(B) maps it back exactly); biases likewise.
  Per-patch-size LoRA (§3.2) is models/lora.py (config.model.lora_rank), trained on the
  flow-matching loss; FlexiDiT's distillation target is not implemented.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ppflow_jax import sampling
from ppflow_jax import stages as stages_lib


def weak_step_boundary(spec: sampling.SamplerSpec, num_weak_steps: int) -> float:
  """The stage boundary that gives the first `num_weak_steps` steps of `spec`'s grid the weak patch.

  It lies halfway between the grid points of steps T_weak - 1 and T_weak, so no evaluation falls
  on it: Euler/SDE steps 0..T_weak-1 are weak; with Heun, step T_weak - 1's corrector (at the
  next grid point) already uses the powerful patch.
  """
  t = sampling.integration_steps(spec).t
  if not 0 < num_weak_steps < len(t):
    raise ValueError(f'num_weak_steps={num_weak_steps} must be in [1, {len(t) - 1}] for a grid '
                     f'of {len(t)} steps (use a one-stage schedule for 0 or all)')
  return float(0.5 * (t[num_weak_steps - 1] + t[num_weak_steps]))


def set_weak_steps(config: ml_collections.ConfigDict, num_weak_steps: int) -> None:
  """Moves a two-stage config's boundary so sampling runs T_weak weak steps (in place).

  Note that training buckets follow the boundary too (Schedule.bucket_sizes); with the
  'flexidit' regime times are U(0, 1) in every bucket, so only the batch split changes.
  """
  if len(config.schedule.patch_sizes) != 2:
    raise ValueError('set_weak_steps needs a two-stage (weak, powerful) schedule, got patch '
                     f'sizes {config.schedule.patch_sizes}')
  spec = sampling.SamplerSpec.from_config(config)
  config.schedule.boundaries = (weak_step_boundary(spec, num_weak_steps),)
  stages_lib.from_config(config)  # validates


def bilinear_resize_matrix(old: tuple[int, int], new: tuple[int, int]) -> np.ndarray:
  """B: (new_h*new_w, old_h*old_w), row-major patches: vec(resize(x)) = B vec(x).

  Bilinear with half-pixel centres and no antialiasing (tf.image.resize, used by FlexiViT).
  """
  basis = jnp.eye(old[0] * old[1], dtype=jnp.float32).reshape(-1, *old)
  out = jax.vmap(lambda e: jax.image.resize(e, new, 'bilinear', antialias=False))(basis)
  return np.asarray(out.reshape(old[0] * old[1], -1).T, np.float64)


def _per_channel(w: np.ndarray, patch: tuple[int, int], channels: int, axis: int) -> np.ndarray:
  """Moves the (ph*pw*C) axis of `w` to the front as (ph*pw, C, rest)."""
  w = np.moveaxis(np.asarray(w, np.float64), axis, 0)
  return w.reshape(patch[0] * patch[1], channels, -1)


def _from_per_channel(w: np.ndarray, shape: tuple[int, ...], axis: int, dtype) -> np.ndarray:
  moved = list(shape)
  moved.insert(0, moved.pop(axis))
  return np.moveaxis(w.reshape(moved), 0, axis).astype(dtype)


def pi_resize_embed(kernel: np.ndarray, old: tuple[int, int], new: tuple[int, int],
                    channels: int) -> np.ndarray:
  """kernel: (oh*ow*C, d) patch embedding -> (nh*nw*C, d) by pinv(B^T) per channel.

  For new >= old: embed_new(resize(x)) == embed_old(x) for every old-size patch x.
  """
  b = bilinear_resize_matrix(old, new)
  w = _per_channel(kernel, old, channels, 0)                       # (oh*ow, C, d)
  w_new = np.einsum('nk,kcd->ncd', np.linalg.pinv(b.T), w)
  return _from_per_channel(w_new, (new[0] * new[1] * channels, kernel.shape[1]), 0, kernel.dtype)


def resize_deembed(kernel: np.ndarray, bias: np.ndarray, old: tuple[int, int],
                   new: tuple[int, int], channels: int) -> tuple[np.ndarray, np.ndarray]:
  """kernel: (d, oh*ow*C), bias: (oh*ow*C,) -> the de-embedding whose output patch is the
  bilinear upsampling of the old one: (d, nh*nw*C), (nh*nw*C,)."""
  b = bilinear_resize_matrix(old, new)
  w = np.einsum('nk,kcd->ncd', b, _per_channel(kernel, old, channels, 1))
  bb = np.einsum('nk,kcd->ncd', b, _per_channel(bias[:, None], old, channels, 1))
  size = new[0] * new[1] * channels
  return (_from_per_channel(w, (kernel.shape[0], size), 1, kernel.dtype),
          _from_per_channel(bb, (size, 1), 0, bias.dtype)[:, 0])


def pi_resize_init(params: dict, config: ml_collections.ConfigDict, source: int,
                   target: int) -> dict:
  """PPF params with stage `target`'s embed/de-embed PI-resized from stage `source` (a new dict).

  The usual use: a pretrained one-stage SiT/2 imported into a two-stage model, then the 4x4
  stage initialised from the 2x2 one (FlexiDiT §3.1; PPFlow's own Listing 1 is the
  nearest-neighbour analogue, `convert/`).
  """
  schedule = stages_lib.from_config(config)
  old, new = schedule.stages[source].patch, schedule.stages[target].patch
  c = config.latent.channels
  c_out = 2 * c if config.model.learn_sigma else c
  out = jax.tree.map(lambda a: a, params)
  emb, dst = params['x_embedders'][source], dict(out['x_embedders'][target])
  dst['kernel'] = jnp.asarray(pi_resize_embed(np.asarray(emb['kernel']), old, new, c))
  dst['bias'] = jnp.asarray(emb['bias'])
  out['x_embedders'][target] = dst
  fin = params['final_linears'][source]
  kernel, bias = resize_deembed(np.asarray(fin['kernel']), np.asarray(fin['bias']), old, new, c_out)
  out['final_linears'][target] = dict(kernel=jnp.asarray(kernel), bias=jnp.asarray(bias))
  return out
