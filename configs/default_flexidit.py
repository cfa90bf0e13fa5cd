"""The embedded default (configs/default.py) trained FlexiDiT-style: every patch size on U(0, 1).

Same model, schedule (4x4 on t <= 0.5, 2x2 after), steps and sampler as the PPF-2 default; only
config.train.regime differs. Arguments: 'weak_guidance' samples with FlexiDiT's weak-model
guidance (the 4x4 conditional prediction guides the 2x2 steps, FlexiDiT §3.4); '3' has the
paper's three-level schedule (4x4, 2x4, 2x2 at 0.5 / 0.75; CFG 1.0, 2.0, 2.0), so the schedule
search can price both the PPF-2 and the PPF-3 hand-set schedules on one model. Any other
argument is configs/default.py's ('runlocal', 'finest').
"""

from configs import default
from ppflow_jax import config_lib


def get_config(arg=None):
  c = default.get_config(None if arg in ('weak_guidance', '3') else arg)
  c.train.regime = 'flexidit'
  if arg == 'weak_guidance':
    c.sample.guidance = 'weak_conditional'
    c.sample.guidance_stage = 0
  elif arg == '3':
    config_lib.set_schedule(c, 3, (1.0, 2.0, 2.0))
  return c
