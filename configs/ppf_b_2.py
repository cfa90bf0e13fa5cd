"""PPF-B-2, ImageNet 256: 4x4 on [0, 0.5], 2x2 on (0.5, 1]; stage CFG [1.5, 3.5] (paper §4.2)."""

from ppflow_jax import config_lib


def get_config(arg=None):
  return config_lib.imagenet_config('B', 2, (1.5, 3.5), arg=arg)
