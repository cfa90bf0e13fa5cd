"""SiT-XL/2, ImageNet 512 (64x64x4 latents): SiT's FID protocol as at 256 (SDE, CFG 1.5 on
latent channels 0..2)."""

from ppflow_jax import config_lib


def get_config(arg=None):
  return config_lib.sit_config('XL', arg, resolution=512)
