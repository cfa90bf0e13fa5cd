"""MPDiT-B (N = 12, k = 6, d = 768, m = 16 class tokens) on ImageNet-256 SD-VAE latents.

MPDiT paper Table 2: 16.6 GFLOPs (multiply-adds; `models/mpdit.py:mpdit_forward_flops`), 72.1%
of DiT-B/2. Patches 4x4 for the first 6 blocks, 2x2 for the last 6; sampled with Euler over 250
steps (251 grid points) as in the paper's evaluation, CFG on all latent channels.
"""

from ppflow_jax import config_lib


def mpdit_config(size: str, cfg_scale: float, arg=None):
  """MPDiT-<size> with k = 6 fine blocks and 16 class tokens (paper defaults)."""
  c = config_lib.imagenet_config(size, 1, (cfg_scale,), arg=arg)
  c.model.update(variant='mpdit', learn_sigma=False, level_embedding=False,
                 mpdit_fine_blocks=6, mpdit_class_tokens=16)
  # The MPDiT paper does not say which latent channels its CFG guides: all of them here.
  c.sample.update(method='euler', num_steps=251, cfg_channels='all')
  if arg == 'runlocal':
    c.model.update(mpdit_fine_blocks=1, mpdit_class_tokens=4)
  return c


def get_config(arg=None):
  return mpdit_config('B', 1.4, arg)
