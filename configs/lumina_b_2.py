"""Lumina-Video training regime on PPF-B-2 (PPFlow paper Table 5, "Lumina-Video method"): both
patch sizes trained on all t with scale-aware shifted sampling (flow.sample_times 'lumina').
"""

from ppflow_jax import config_lib


def get_config(arg=None):
  c = config_lib.imagenet_config('B', 2, (1.5, 3.5), arg=arg)
  c.train.regime = 'lumina'
  return c
