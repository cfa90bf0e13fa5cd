"""FlexiDiT-style XL/2 on ImageNet 256: PPF-XL-2's two patch sizes, each trained on all t.

FlexiDiT (Anagnostidis et al. 2025) fine-tunes DiT-XL/2 for a weak 4x4 patch on every timestep
and samples with the weak patch for the first T_weak steps. Set T_weak with
`ppflow_jax.experiments.flexidit.set_weak_steps(config, T_weak)` (it moves the stage boundary between grid
points). `arg='weak_guidance'` also guides the 2x2 steps with the 4x4 conditional prediction.
"""

from ppflow_jax import config_lib


def get_config(arg=None):
  weak = arg == 'weak_guidance'
  c = config_lib.imagenet_config('XL', 2, (1.0, 3.0), arg=None if weak else arg)
  c.train.regime = 'flexidit'
  if weak:
    c.sample.guidance = 'weak_conditional'
    c.sample.guidance_stage = 0
  return c
