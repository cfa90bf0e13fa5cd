"""The mini reproduction (experiments/mini_repro.py): SiT on Fashion-MNIST, PPF-2/3 fine-tuned.

The SiT baseline's run config (configs/default.py's data and model, one 2x2 stage, no guidance:
every stage's CFG scale is 1.0) with the mini reproduction's budget: config.train for the SiT,
config.sample for every model's sampler (config.sample.batch_size images per timed batch),
config.eval.num_samples per model for FID / precision / recall, and config.mini_repro for the
rest. The experiment swaps in the PPF-2 / PPF-3 schedules and the fine-tuning fields.

  python -m ppflow_jax.experiments.mini_repro --workdir=/tmp/m --config=mini_repro:quick \\
      --config.train.steps=20

Arguments: None (the full run, ~25 min on 2 CPU cores) or 'quick' (a 1-2 min smoke test with a
one-block model; meaningless numbers). Euler in 'quick': one program per stage (Heun's stage
crossings compile more).
"""

import ml_collections

from ppflow_jax import config_lib


def get_config(arg=None):
  c = config_lib.load_config('default')
  config_lib.set_schedule(c, 1, (1.0,))
  c.train.update(steps=400, batch_size=32, lr=1e-3, warmup_steps=50,
                 ema_decay=0.99,  # short runs: the EMA must forget the initialisation
                 final_report=False, sample_every=0, log_every=50)
  c.sample.update(method='heun', num_steps=9, batch_size=100)  # 8 Heun steps, 16 evaluations
  c.eval.num_samples = 500
  c.checkpoint.update(every_steps=100, max_to_keep=1)
  c.mini_repro = ml_collections.ConfigDict(dict(
      finetune_fraction=0.1,    # PPF fine-tuning steps / SiT steps (paper: <= 10%)
      finetune_ema_decay=0.95,
      floor_samples=100,        # untrained-SiT samples (FID compared at this count too)
      classifier_steps=0,       # Fashion-MNIST classifier steps; 0 = its default
  ))
  if arg == 'quick':
    c.model.update(depth=1, hidden_size=32, num_heads=2)
    c.train.update(steps=10, batch_size=8, warmup_steps=0, log_every=5)
    c.sample.update(method='euler', num_steps=5, batch_size=10)
    c.eval.num_samples = 20
    c.checkpoint.every_steps = 10
    c.mini_repro.update(floor_samples=10, classifier_steps=20)
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use "quick" or none')
  return c
