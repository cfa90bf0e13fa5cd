"""SiT-S/2, ImageNet 256: the one-stage baseline (SiT's FID setting: SDE, CFG 1.5)."""

from ppflow_jax import config_lib


def get_config(arg=None):
  return config_lib.sit_config('S', arg)
