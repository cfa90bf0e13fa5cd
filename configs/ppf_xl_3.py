"""PPF-XL-3, ImageNet 256: 4x4, 2x4 (rows x cols), 2x2 at 0.5 / 0.75; stage CFG [1.0, 3.5, 3.75]."""

from ppflow_jax import config_lib


def get_config(arg=None):
  return config_lib.imagenet_config('XL', 3, (1.0, 3.5, 3.75), arg=arg)
