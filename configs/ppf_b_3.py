"""PPF-B-3, ImageNet 256: 4x4, 2x4 (rows x cols), 2x2 at 0.5 / 0.75; stage CFG [1.5, 3.5, 4.0]."""

from ppflow_jax import config_lib


def get_config(arg=None):
  return config_lib.imagenet_config('B', 3, (1.5, 3.5, 4.0), arg=arg)
