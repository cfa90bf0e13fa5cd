"""The benchmarks' setup (ppflow_jax/bench/): what SiT, PPF-2 and PPF-3 share in a comparison.

A full PPF-2 run config (so `flops`, `main` and the config tests read it) whose model size,
latent, batch (config.sample.batch_size images per sampling call, config.train.batch_size per
train step) and precision every compared model takes; each benchmark swaps in each model's paper
schedule (bench/common.make_config). Weights are freshly initialised: run time does not depend on
them. Overrides as for any config:

  python -m ppflow_jax.bench.sample --config=bench:XL --config.model.dtype=float32

Arguments: a size preset 'S' | 'B' (default) | 'L' | 'XL' of config_lib.MODEL_SIZES on ImageNet-256
latents (32x32x4, 1000 classes; batch 16, XL 64), bfloat16; or 'tiny': 2 blocks x 64 wide on
16x16x2 latents, 10 classes, batch 4, float32 (CI on a 2-core CPU).
"""

from ppflow_jax import config_lib


def get_config(arg='B'):
  arg = arg or 'B'
  if arg != 'tiny' and arg not in config_lib.MODEL_SIZES:
    raise ValueError(f'unknown bench config argument {arg!r}; use tiny or a size: '
                     f'{", ".join(config_lib.MODEL_SIZES)}')
  c = config_lib.imagenet_config('S' if arg == 'tiny' else arg, 2, (1.0, 1.0))
  c.model.dtype = 'bfloat16'
  batch = 64 if arg == 'XL' else 16
  if arg == 'tiny':
    c.model.update(depth=2, hidden_size=64, num_heads=2, num_classes=10, dtype='float32')
    c.latent.update(height=16, width=16, channels=2)
    batch = 4
  c.sample.batch_size = c.train.batch_size = batch
  return c
