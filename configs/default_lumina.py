"""The embedded default trained Lumina-Video-style: every patch size on all times, shifted
(flow.sample_times: 4x4 biased to high noise with shift 1/3, 2x2 to low noise with shift 3).

Same model, schedule, steps and sampler as the PPF-2 default; only config.train.regime differs.
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.train.regime = 'lumina'
  return c
