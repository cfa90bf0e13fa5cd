"""PPF initialisation from a pretrained SiT (paper §3.3, Listing 1; official PPFlow code).

Shared weights (DiT blocks, timestep and label embedders, final adaLN) are copied; the finest
stage takes SiT's patch embedding and final linear as they are. A coarse stage with patch
(ph, pw) = (m*fh, n*fw) over SiT's (fh, fw) gets

  embed:   kernel[(r, c, ch)] = K_sit[(r // m, c // n, ch)] / (m*n), bias = SiT's bias
  de-embed kernel[:, (r, c, ch)] = U_sit[:, (r // m, c // n, ch)], bias likewise (no scaling)

which is what the official `repeat_interleave(W / (m*n), m*n, dim=1)` over its space-to-depth
channels (and `repeat_interleave(L, m*n, dim=0)` for the output) means in our (row, col,
channel) token order. Its meaning: each m x n block of the coarse patch shares one SiT weight, so
a coarse token is SiT's patch embedding of the (m, n)-average-pooled latent, and each SiT output
value is repeated over its m x n block (nearest upsampling). Hence, right after init, with
B = (H/m, W/n) the pooled size:

  PPF_s(x, t, y) = upsample_{m,n}( SiT_B(avgpool_{m,n}(x), t, y | pos = P_s, c += e_s) )

exactly (up to float rounding), where P_s is stage s's positional embedding (the finest grid's
sin-cos values at each coarse token's top-left fine position, which SiT at size B does not use:
it would use positions 0, 1, 2, ... of its own smaller grid) and e_s is the fresh level-embedding
row added to the conditioning vector. The finest stage is SiT itself with `c += e_last`, i.e.
exactly SiT when the level embedding is off (config.model.level_embedding=False) or its row is 0.
The level embedding is drawn fresh, N(0, 0.02), as in the official code.
"""

from __future__ import annotations

import copy
import os

import jax
import ml_collections
import numpy as np
from flax import nnx
from flax import traverse_util

from ppflow_jax.convert import sit as sit_lib
from ppflow_jax.convert import torch_io
from ppflow_jax.models import block_stack


def sit_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` reduced to one stage with its finest patch: the SiT that PPF starts from."""
  c = copy.deepcopy(config)
  c.schedule.boundaries = ()
  c.schedule.patch_sizes = (tuple(config.schedule.patch_sizes[-1]),)
  c.schedule.cfg_scales = (config.schedule.cfg_scales[-1],)
  return c


def expand_kernel(k: np.ndarray, fine: tuple[int, int], factors: tuple[int, int],
                  channels: int, *, axis: int) -> np.ndarray:
  """Nearest-upsamples the patch grid of a kernel axis holding (fh, fw, channels) values.

  k: a kernel whose `axis` has fh*fw*channels entries in (row, col, channel) order -> the same
  kernel with (fh*m)*(fw*n)*channels entries, entry (r, c, ch) taken from (r // m, c // n, ch).
  """
  (fh, fw), (m, n) = fine, factors
  k = np.moveaxis(k, axis, 0)
  rest = k.shape[1:]
  k = k.reshape(fh, fw, channels, *rest)
  k = np.repeat(np.repeat(k, m, axis=0), n, axis=1)
  return np.moveaxis(k.reshape(fh * m * fw * n * channels, *rest), 0, axis)


def expand_sit_params(sit_params: dict, config: ml_collections.ConfigDict, *,
                      seed: int | None = None) -> dict:
  """Pure params of a one-stage SiT (`PPFModel(sit_config(config))`) -> params of `config`.

  seed: for the fresh level embedding (default config.seed).
  """
  scanned, config = config.model.scan_blocks, block_stack.with_layout(config, False)
  sit_params = block_stack.to_layout(sit_params, False)
  model = sit_lib.abstract_model(config)
  schedule, fine = model.schedule, model.schedule.finest.patch
  c_in, c_out = model.in_channels, model.out_channels
  want = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(
      sit_lib.abstract_model(sit_config(config)))))
  got = traverse_util.flatten_dict(sit_params)
  bad = sorted({str(p) for p in set(want) ^ set(got)}
               | {f'{p}: {np.shape(got[p])} vs {want[p].shape}' for p in set(want) & set(got)
                  if np.shape(got[p]) != want[p].shape})
  if bad:
    raise ValueError('the SiT params do not fit the one-stage (finest patch) model of this config '
                     f'(check model size, learn_sigma, latent channels): {bad}')

  params = {p: np.asarray(v) for p, v in got.items()
            if p[0] not in ('x_embedders', 'final_linears')}
  k_in, b_in = (np.asarray(got[('x_embedders', 0, n)]) for n in ('kernel', 'bias'))
  k_out, b_out = (np.asarray(got[('final_linears', 0, n)]) for n in ('kernel', 'bias'))
  for s, stage in enumerate(schedule.stages):
    f = (stage.patch[0] // fine[0], stage.patch[1] // fine[1])
    area = f[0] * f[1]
    params[('x_embedders', s, 'kernel')] = expand_kernel(k_in, fine, f, c_in, axis=0) / area
    params[('x_embedders', s, 'bias')] = b_in
    params[('final_linears', s, 'kernel')] = expand_kernel(k_out, fine, f, c_out, axis=1)
    params[('final_linears', s, 'bias')] = expand_kernel(b_out, fine, f, c_out, axis=0)
  target = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
  if ('level_embedder', 'embedding') in target:
    shape = target[('level_embedder', 'embedding')].shape
    key = jax.random.key(config.seed if seed is None else seed)
    params[('level_embedder', 'embedding')] = 0.02 * np.asarray(jax.random.normal(key, shape))
  return block_stack.to_layout(traverse_util.unflatten_dict(
      {p: np.asarray(params[p], dtype=target[p].dtype) for p in target}), scanned)


def sit_params_from_state(state: dict[str, np.ndarray], config: ml_collections.ConfigDict, *,
                          source: str = 'checkpoint') -> dict:
  """A SiT/DiT state dict -> params of the one-stage model `sit_config(config)`."""
  layout = sit_lib.detect_layout(state)
  if layout.kind != 'sit':
    raise ValueError(f'{source} is {layout.name} checkpoint, not SiT/DiT: load it directly '
                     '(load_torch_checkpoint / the CLI without --init_from_sit)')
  return sit_lib.convert_state_dict(state, sit_config(config), source=source)


def init_from_sit(sit_params_or_path: dict | str | os.PathLike, config: ml_collections.ConfigDict,
                  *, seed: int | None = None) -> dict:
  """PPF params for `config` initialised from SiT (a .pt/.safetensors file or one-stage params).

  seed: for the fresh level embedding (default config.seed).
  """
  if isinstance(sit_params_or_path, (str, os.PathLike)):
    path = os.fspath(sit_params_or_path)
    sit_params = sit_params_from_state(torch_io.read_state_dict(path), config, source=path)
  else:
    sit_params = sit_params_or_path
  return expand_sit_params(sit_params, config, seed=seed)
