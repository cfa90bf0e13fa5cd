"""The mini reproduction (experiments/mini_repro.py): SiT on Fashion-MNIST, PPF-2/3 fine-tuned.

The SiT baseline's run config (configs/default.py's data and model, one 2x2 stage, no guidance:
every stage's CFG scale is 1.0) with the mini reproduction's budget: config.train for the SiT,
config.sample for every model's sampler (config.sample.batch_size images per timed batch),
config.eval.num_samples per model for FID / precision / recall, and config.mini_repro for the
rest. The experiment swaps in the PPF-2 / PPF-3 schedules and the fine-tuning fields.

  python -m ppflow_jax.experiments.mini_repro --workdir=/tmp/m --config=mini_repro:quick \\
      --config.train.steps=20

Arguments: None (the full run, ~25 min on 2 CPU cores), 'quick' (a 1-2 min smoke test with a
one-block model; meaningless numbers), 'converged' (issue 14 item 6: the SiT, at doubled
patches, trained until its loss and FID plateau, checked every 1000 steps up to 16k; PPF-2/3
fine-tuned for 10% and 20% of its steps with two seeds, plus the initialised PPFs; ~2-2.5
hours on 2 cores, resumable; docs/mini_repro.md) and 'converged_quick' (its smoke test with the
'quick' model). Euler in 'quick': one program per stage (Heun's stage crossings compile more).
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
      finetune_fractions=(0.1,),  # PPF fine-tuning steps / SiT steps (paper: <= 10%)
      seeds=(0,),               # fine-tuning seeds (data order, noise, level embedding)
      # The SiT's plateau loop (0: train config.train.steps): every plateau_every steps, up to
      # max_steps, score the EMA (FID on plateau_samples images) and the chunk's mean loss; stop
      # when neither improved over `patience` checks by more than the larger of plateau_tol
      # (relative) and plateau_noise times its own noise (the mean loss's standard error, the
      # FID's bootstrap std).
      plateau_every=0, max_steps=0, patience=3, plateau_tol=0.02, plateau_noise=2.0,
      plateau_samples=500,
      # PPF fine-tuning: EMA decay, peak lr (0: the SiT's train.lr), linear warm-up over this
      # fraction of its steps; Adam's state starts fresh.
      finetune_ema_decay=0.95, finetune_lr=0.0, finetune_warmup_fraction=0.25,
      patch_scale=1,            # every patch side times this (2: SiT 4x4, PPF-2 8x8 | 4x4, ...)
      floor_samples=100,        # untrained-SiT samples (FID compared at this count too)
      classifier_steps=0,       # Fashion-MNIST classifier steps; 0 = its default
  ))
  if arg in ('converged', 'converged_quick'):
    # Patches doubled (64 tokens at the finest stage instead of 256): ~2.5x faster SiT steps, so
    # 1000 steps take ~7 min on 2 cores with their check; patch_scale=1, max_steps=20000 is the
    # 2x2 version (many CPU hours). 1000-sample checks halve the 500-sample FID noise
    # (16.5 vs 19.2 for the same weights on two noise seeds).
    c.mini_repro.update(finetune_fractions=(0.1, 0.2), seeds=(0, 1), plateau_every=1000,
                        plateau_samples=1000, max_steps=16000, patch_scale=2)
    c.train.log_every = 25
  if arg in ('quick', 'converged_quick'):
    c.model.update(depth=1, hidden_size=32, num_heads=2)
    c.train.update(steps=10, batch_size=8, warmup_steps=0, log_every=5)
    c.sample.update(method='euler', num_steps=5, batch_size=10)
    c.eval.num_samples = 20
    c.checkpoint.every_steps = 10
    c.mini_repro.update(floor_samples=10, classifier_steps=20)
  if arg == 'converged_quick':
    c.train.log_every = 2
    c.mini_repro.update(plateau_every=5, max_steps=10, patience=1, plateau_samples=20)
  if arg not in (None, 'quick', 'converged', 'converged_quick'):
    raise ValueError(f'unknown config argument {arg!r}; use "quick", "converged", '
                     '"converged_quick" or none')
  return c
