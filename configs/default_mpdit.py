"""The embedded default's budget spent on a tiny MPDiT: 4 blocks of width 128, the first 2 on 4x4
tokens (64 + 4 class tokens), the last 2 on 2x2 tokens (256 + 4), as MPDiT-B's N/2 split.

Same data, steps, optimizer and sampler (Heun, 21 grid points) as the PPF-2 default. MPDiT has
one time stage, so it uses a single CFG scale (2.0, the default's fine-stage scale) at every t.
"""

from configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.model.update(variant='mpdit', level_embedding=False, mpdit_fine_blocks=2,
                 mpdit_class_tokens=4)
  c.schedule.update(boundaries=(), patch_sizes=((2, 2),), cfg_scales=(2.0,))
  return c
