"""The paper's claim in miniature on Fashion-MNIST (32x32x1), on a CPU in under an hour.

  python -m ppflow_jax.experiments.mini_repro --workdir=/tmp/mini_repro          # full run (~25 min, 2 cores)
  python -m ppflow_jax.experiments.mini_repro --workdir=/tmp/mini_quick --quick  # smoke test (1-2 min)

Recipe (paper §3.3 / §4, shrunk): train a SiT baseline (one stage, 2x2 patches) for N steps;
initialise PPF-2 (4x4 | 2x2, boundary 0.5) and PPF-3 (4x4 | 2x4 | 2x2, boundaries 0.5 / 0.75)
from its EMA weights with the paper's initialisation (convert/init_from_sit.py) and fine-tune
each for 10% of N. Then all three (and, as a floor, the untrained SiT) sample the same noise and
labels with the same sampler, batch by batch and interleaved, so the measured sampling times
share the machine's load; the first batch (compilation) is not timed and the median over the
other batches is reported. Quality is FID / precision / recall in the feature space of the
Fashion-MNIST classifier (evaluation/fmnist_features.py) against the 10k test images, next to
the analytic testing-FLOPs ratio (flops.py).

Writes to --workdir: sit/, ppf2/, ppf3/ (training workdirs; a rerun resumes), results.json,
results.md, fid_vs_time.png and samples.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging

from ppflow_jax import checkpoint
from ppflow_jax import config_lib
from ppflow_jax import flops
from ppflow_jax import inference
from ppflow_jax import loop
from ppflow_jax import report
from ppflow_jax import sampling
from ppflow_jax.convert import init_from_sit
from ppflow_jax.evaluation import fmnist_features
from ppflow_jax.evaluation import sample as sample_lib



@dataclasses.dataclass(frozen=True)
class Recipe:
  """Model size, training and evaluation budget of one mini reproduction."""
  depth: int = 4
  hidden_size: int = 128
  num_heads: int = 4
  batch_size: int = 32
  lr: float = 1e-3
  warmup_steps: int = 50
  ema_decay: float = 0.99          # short runs: the EMA must forget the initialisation.
  sit_steps: int = 400
  finetune_fraction: float = 0.1   # PPF fine-tuning steps / SiT steps (paper: <= 10%).
  finetune_ema_decay: float = 0.95
  method: str = 'heun'
  num_steps: int = 9               # grid points: 8 Heun steps, 16 model evaluations.
  num_samples: int = 500           # per model, for FID / precision / recall.
  sample_batch: int = 100          # one timed sampling call.
  floor_samples: int = 100         # untrained-model samples (FID compared at this count too).
  classifier_steps: int = fmnist_features.DEFAULT_TRAIN_STEPS
  checkpoint_every: int = 100

  @property
  def finetune_steps(self) -> int:
    return max(1, int(self.sit_steps * self.finetune_fraction))


# Euler: one program per stage (Heun's stage crossings compile more); the rest is shrunk too.
QUICK = Recipe(depth=1, hidden_size=32, num_heads=2, batch_size=8, warmup_steps=0, sit_steps=10,
               method='euler', num_steps=5, num_samples=20, sample_batch=10, floor_samples=10,
               classifier_steps=20, checkpoint_every=10)

# name -> number of stages (config_lib.SCHEDULES); 'untrained' is the SiT at initialisation.
MODELS = {config_lib.model_label(name, patches=True): stages
          for name, (_, stages) in config_lib.PAPER_MODELS.items()}
_DIRS = {stages: name for name, (_, stages) in config_lib.PAPER_MODELS.items()}


def make_config(recipe: Recipe, num_stages: int, finetune: bool) -> ml_collections.ConfigDict:
  """The default config with the recipe's model and the paper's `num_stages` schedule."""
  c = config_lib.load_config('configs/default.py')
  c.model.update(depth=recipe.depth, hidden_size=recipe.hidden_size, num_heads=recipe.num_heads)
  # No guidance: every stage's scale is 1.0 (one pass), so all models pay the same per step.
  config_lib.set_schedule(c, num_stages, (1.0,) * num_stages)
  c.train.update(batch_size=recipe.batch_size, lr=recipe.lr, final_report=False, sample_every=0,
                 log_every=max(1, recipe.checkpoint_every // 2))
  if finetune:
    c.train.update(steps=recipe.finetune_steps, ema_decay=recipe.finetune_ema_decay,
                   warmup_steps=recipe.finetune_steps // 4)
  else:
    c.train.update(steps=recipe.sit_steps, ema_decay=recipe.ema_decay,
                   warmup_steps=recipe.warmup_steps)
  c.sample.update(method=recipe.method, num_steps=recipe.num_steps, batch_size=recipe.sample_batch)
  c.checkpoint.update(every_steps=recipe.checkpoint_every, max_to_keep=1)
  return config_lib.resolve(c)


def train_models(recipe: Recipe, workdir: str) -> dict:
  """SiT for sit_steps, then PPF-2/3 from its EMA for finetune_steps -> {stages: Inference of
  the EMA weights}, plus {0: ...} for the untrained SiT. Finished runs are reloaded, not redone."""
  models, seconds = {}, {}
  t0 = time.time()
  sit_cfg = make_config(recipe, 1, finetune=False)
  trainer, state = loop.train_and_evaluate(sit_cfg, os.path.join(workdir, _DIRS[1]))
  models[1] = inference.Inference.from_trainer(trainer, state.ema, step=state.step)
  models[0] = inference.Inference.from_trainer(trainer, trainer.init_state().ema)
  seconds['sit'] = time.time() - t0
  sit_ema = jax.device_get(state.ema)
  for stages in (2, 3):
    t0 = time.time()
    cfg = make_config(recipe, stages, finetune=True)
    init_dir = os.path.join(workdir, f'{_DIRS[stages]}_init')
    if not os.path.isdir(os.path.join(init_dir, checkpoint.PARAMS_DIR)):
      checkpoint.save_params(init_dir, init_from_sit(sit_ema, cfg), cfg)
    cfg.train.init_from = init_dir
    trainer, state = loop.train_and_evaluate(cfg, os.path.join(workdir, _DIRS[stages]))
    models[stages] = inference.Inference.from_trainer(trainer, state.ema, step=state.step)
    seconds[_DIRS[stages]] = time.time() - t0
  return models, seconds


def sample_interleaved(recipe: Recipe, models: dict, seed: int) -> tuple[dict, dict, np.ndarray]:
  """Samples recipe.num_samples images per model, batch by batch in turn (same noise and labels
  for all) -> ({stages: images (N, 32, 32, 1) in [-1, 1]}, {stages: [seconds per timed batch]},
  labels (N,)). Label i = i mod 10, so every prefix is class-balanced."""
  n, bs = recipe.num_samples, recipe.sample_batch
  if n % bs or n // bs < 2:
    raise ValueError(f'num_samples={n} must be a multiple (>= 2x) of sample_batch={bs}: the '
                     'first batch compiles and is not timed')
  labels = (np.arange(n) % 10).astype(np.int32)
  # the untrained SiT shares the SiT's compiled programs
  samplers = {k: model.sampler() for k, model in models.items() if k != 0}
  samplers[0] = samplers[1]
  outs = {k: [] for k in models}
  times = {k: [] for k in models}
  for b in range(n // bs):
    idx = np.arange(b * bs, (b + 1) * bs)
    for k, model in models.items():
      if k == 0 and b * bs >= recipe.floor_samples:
        continue
      noise, keys = sampling.index_noise(model.latent_shape, idx, seed)
      y = jax.numpy.asarray(labels[idx])
      jax.block_until_ready((noise, keys, y))
      t0 = time.perf_counter()
      x = jax.block_until_ready(samplers[k].sample(model.params, noise, y, keys))
      if b:  # batch 0 compiles
        times[k].append(time.perf_counter() - t0)
      outs[k].append(np.asarray(x))
    logging.info('sampled batch %d/%d', b + 1, n // bs)
  return {k: np.concatenate(v) for k, v in outs.items()}, times, labels


def evaluate(recipe: Recipe, workdir: str, models: dict, seconds: dict) -> dict:
  """Samples, scores and times every model -> the results dict (also written as JSON)."""
  evaluator = fmnist_features.FMNISTEvaluator(os.path.join(workdir, 'fmnist_classifier'),
                                              train_steps=recipe.classifier_steps)
  t0 = time.time()
  images, times, labels = sample_interleaved(recipe, models, seed=1234)
  seconds['sampling'] = time.time() - t0
  nf = recipe.floor_samples
  rows = []
  for k, model in models.items():
    x = np.clip(images[k], -1.0, 1.0)
    row = dict(model='untrained SiT' if k == 0 else list(MODELS)[k - 1], stages=max(k, 1),
               train_steps=0 if k == 0 else (recipe.sit_steps if k == 1 else
                                             recipe.sit_steps + recipe.finetune_steps),
               fid_floor_n=evaluator.score(x[:nf], labels[:nf])['fid'])
    if k:
      scores = evaluator.score(x, labels[:len(x)])
      spec = model.sampler().spec
      row.update(fid=scores['fid'], precision=scores['precision'], recall=scores['recall'],
                 label_accuracy=scores['accuracy_of_labels'],
                 seconds_per_batch=float(np.median(times[k])), timed_batches=len(times[k]),
                 flops_ratio=float(flops.testing_flops_ratio(model.config, spec)),
                 evaluations=sampling.num_evaluations(model.schedule, spec))
    rows.append(row)
  base = next(r for r in rows if r['stages'] == 1 and r['train_steps'])
  for r in rows:
    if 'seconds_per_batch' in r:
      r['speedup'] = base['seconds_per_batch'] / r['seconds_per_batch']
  cfg = models[1].config
  result = dict(
      rows=rows, recipe=dataclasses.asdict(recipe), finetune_steps=recipe.finetune_steps,
      sampler=f'{cfg.sample.method}, {cfg.sample.num_steps} grid points, no guidance',
      num_samples=recipe.num_samples, sample_batch=recipe.sample_batch,
      classifier_test_accuracy=evaluator.test_accuracy, phase_seconds=seconds,
      device=f'{jax.devices()[0].device_kind} x{jax.device_count()} ({os.cpu_count()} cores)',
      jax_version=jax.__version__, code_version=sample_lib.code_version())
  nrow = 10
  grids = [report.to_uint8(np.clip(images[k][:3 * nrow], -1, 1)) for k in sorted(models)]
  report.save_grid(np.concatenate(grids), os.path.join(workdir, 'samples.png'), nrow, scale=2)
  return result


def markdown(result: dict) -> str:
  """The results table (Markdown)."""
  timed = next(r['timed_batches'] for r in result['rows'] if 'timed_batches' in r)
  lines = [
      f'Sampler: {result["sampler"]}; {result["num_samples"]} samples per model (labels i mod '
      f'10), same noise for every model; time = median over {timed} '
      f'batches of {result["sample_batch"]} after a compile batch, models interleaved; '
      f'{result["device"]}.', '',
      '| model | train steps | FID | precision | recall | s / batch | speed-up | testing FLOPs |'
      f' FID@{result["recipe"]["floor_samples"]} |',
      '|---|---|---|---|---|---|---|---|---|']
  for r in result['rows']:
    if 'fid' in r:
      lines.append(f'| {r["model"]} | {r["train_steps"]} | {r["fid"]:.2f} | {r["precision"]:.3f}'
                   f' | {r["recall"]:.3f} | {r["seconds_per_batch"]:.2f} | {r["speedup"]:.2f}x |'
                   f' {100 * r["flops_ratio"]:.1f}% | {r["fid_floor_n"]:.2f} |')
    else:
      lines.append(f'| {r["model"]} | 0 | | | | | | | {r["fid_floor_n"]:.2f} |')
  lines += ['', f'FID / precision / recall: Fashion-MNIST classifier features (test accuracy '
            f'{result["classifier_test_accuracy"]:.3f}) vs the 10k test images; not Inception FID. '
            f'FID@{result["recipe"]["floor_samples"]}: the first '
            f'{result["recipe"]["floor_samples"]} samples only (for the untrained floor).', '']
  return '\n'.join(lines)


def plot(result: dict, path: str) -> None:
  """FID against measured seconds per batch, one point per trained model."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for r in result['rows']:
    if 'fid' in r:
      ax.scatter(r['seconds_per_batch'], r['fid'], s=40)
      ax.annotate(f'{r["model"].split(" ")[0]} ({100 * r["flops_ratio"]:.0f}% FLOPs)',
                  (r['seconds_per_batch'], r['fid']), textcoords='offset points', xytext=(5, 5),
                  fontsize=8)
  ax.set_xlabel(f'sampling seconds per batch of {result["sample_batch"]}')
  ax.set_ylabel('FID (Fashion-MNIST features)')
  ax.set_title('Mini reproduction: quality vs sampling time')
  ax.margins(0.25)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(workdir: str, recipe: Recipe) -> dict:
  """Trains, samples and scores the three models; writes results.{json,md} and the plots."""
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  models, seconds = train_models(recipe, workdir)
  result = evaluate(recipe, workdir, models, seconds)
  result['total_seconds'] = time.time() - start
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(markdown(result))
  plot(result, os.path.join(workdir, 'fid_vs_time.png'))
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  recipe = QUICK if f.quick else Recipe()
  if f.sit_steps:
    recipe = dataclasses.replace(recipe, sit_steps=f.sit_steps)
  if f.num_samples:
    recipe = dataclasses.replace(recipe, num_samples=f.num_samples)
  if f.finetune_fraction:
    recipe = dataclasses.replace(recipe, finetune_fraction=f.finetune_fraction)
  result = run(f.workdir, recipe)
  print(markdown(result))
  print(f'total {result["total_seconds"]:.0f} s; results in {f.workdir}')


def define_flags() -> None:
  """The command line's flags (defined under `__main__` only: this module is also a library)."""
  flags.DEFINE_string('workdir', None, 'Where models, samples and results go.')
  flags.DEFINE_bool('quick', False, 'Tiny smoke-test recipe (1-2 min; meaningless numbers).')
  flags.DEFINE_integer('sit_steps', 0, 'Override the SiT baseline steps (0 = recipe).')
  flags.DEFINE_integer('num_samples', 0, 'Override samples per model (0 = recipe).')
  flags.DEFINE_float('finetune_fraction', 0.0,
                     'Override PPF fine-tuning steps / SiT steps (0 = recipe: 0.1).')
  flags.mark_flag_as_required('workdir')


if __name__ == '__main__':
  define_flags()
  app.run(main)
