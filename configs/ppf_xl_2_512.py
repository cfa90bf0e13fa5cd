"""PPF-XL-2, ImageNet 512 (64x64x4 latents). The paper gives no 512 CFG scales; the 256
ones are used."""

from ppflow_jax import config_lib


def get_config(arg=None):
  return config_lib.imagenet_config('XL', 2, (1.0, 3.0), resolution=512, arg=arg)
