"""The embedded default: a small two-stage PPF trained on Fashion-MNIST on 2 CPU cores.

The 28x28 images are padded to 32x32x1 and used directly as the "latent", so token counts match
ImageNet-256 SD latents (256 tokens at 2x2, 64 at 4x4). After training, main samples a
class-conditional grid with stage-wise CFG and writes report.md comparing PPF sampling time with
the same weights forced to the finest patch, measured side by side, next to the FLOPs ratio.

Arguments: 'runlocal' (a shorter run of the same recipe); 'finest' (the same model sampled at its
finest patch at every t: the SiT-cost speed reference of experiments/compare.py).
"""

from ppflow_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.model.update(config_lib.model_config('S', depth=4, hidden_size=128, num_heads=4,
                                         num_classes=10, learn_sigma=False))
  c.latent.update(height=32, width=32, channels=1)
  config_lib.set_schedule(c, 2, (1.0, 2.0))
  c.data.source = 'fashion_mnist'
  c.data.flip = False   # keeps garments in their canonical orientation
  c.vae.path = ''
  c.train.update(steps=600, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.99,
                 grad_clip_norm=1.0, log_every=50, final_report=True)
  c.sample.update(method='heun', num_steps=21, batch_size=25, num_images=50)
  c.eval.report_samples = 100
  c.checkpoint.update(every_steps=200, max_to_keep=2)
  if arg == 'runlocal':
    c.train.update(steps=30, log_every=10)
    c.sample.update(num_steps=6, num_images=10, batch_size=10)
    c.eval.report_samples = 20
  elif arg == 'finest':
    c.sample.force_finest = True
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use "runlocal" or "finest"')
  return c
