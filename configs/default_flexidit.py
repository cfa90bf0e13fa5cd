"""The embedded default (configs/default.py) trained FlexiDiT-style: every patch size on U(0, 1).

Same model, schedule (4x4 on t <= 0.5, 2x2 after), steps and sampler as the PPF-2 default; only
config.train.regime differs. With `arg='weak_guidance'` sampling uses FlexiDiT's weak-model
guidance (the 4x4 conditional prediction guides the 2x2 steps, FlexiDiT §3.4).
"""

from configs import default


def get_config(arg=None):
  weak = arg == 'weak_guidance'
  c = default.get_config(None if weak else arg)
  c.train.regime = 'flexidit'
  if weak:
    c.sample.guidance = 'weak_conditional'
    c.sample.guidance_stage = 0
  return c
