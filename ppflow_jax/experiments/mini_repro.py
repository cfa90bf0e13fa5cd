"""The paper's claim in miniature on Fashion-MNIST (32x32x1), on a CPU in under an hour.

  python -m ppflow_jax.experiments.mini_repro --workdir=/tmp/mini_repro  # full run, ~25 min
  python -m ppflow_jax.experiments.mini_repro --workdir=/tmp/mini_quick \
      --config=mini_repro:quick                                        # smoke test, 1-2 min

The recipe is configs/mini_repro.py (`--config.train.steps=4000`, ... override it): paper §3.3 /
§4, shrunk. Train a SiT baseline (one stage, 2x2 patches) for N steps; initialise PPF-2 (4x4 |
2x2, boundary 0.5) and PPF-3 (4x4 | 2x4 | 2x2, boundaries 0.5 / 0.75) from its EMA weights with
the paper's initialisation (convert/init_from_sit.py) and fine-tune each for 10% of N. Then all
three (and, as a floor, the untrained SiT) sample the same noise and labels with the same
sampler, batch by batch and interleaved, so the measured sampling times share the machine's
load; the first batch (compilation) is not timed and the median over the other batches is
reported. Quality is FID / precision / recall in the feature space of the Fashion-MNIST
classifier (evaluation/fmnist_features.py) against the 10k test images, next to the analytic
testing-FLOPs ratio (flops.py).

Writes to --workdir: sit/, ppf2/, ppf3/ (training workdirs; a rerun resumes), results.json,
results.md, fid_vs_time.png and samples.png.
"""

from __future__ import annotations

import copy
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ppflow_jax import checkpoint
from ppflow_jax import cli
from ppflow_jax import config_lib
from ppflow_jax import errors
from ppflow_jax import flops
from ppflow_jax import inference
from ppflow_jax import loop
from ppflow_jax import paths
from ppflow_jax import report
from ppflow_jax import sampling
from ppflow_jax.convert import init_from_sit
from ppflow_jax.evaluation import fmnist_features
from ppflow_jax.evaluation import sample as sample_lib



# name -> number of stages (config_lib.SCHEDULES); 'untrained' is the SiT at initialisation.
MODELS = {config_lib.model_label(name, patches=True): stages
          for name, (_, stages) in config_lib.PAPER_MODELS.items()}
_DIRS = {stages: name for name, (_, stages) in config_lib.PAPER_MODELS.items()}


def finetune_steps(config: ml_collections.ConfigDict) -> int:
  """PPF fine-tuning steps: config.mini_repro.finetune_fraction of the SiT's config.train.steps."""
  return max(1, int(config.train.steps * config.mini_repro.finetune_fraction))


def make_config(config: ml_collections.ConfigDict, num_stages: int,
                finetune: bool) -> ml_collections.ConfigDict:
  """The mini reproduction's `config` (configs/mini_repro.py, the SiT's) with the paper's
  `num_stages` schedule, no guidance, and with `finetune` the PPF fine-tuning fields; resolved."""
  c = copy.deepcopy(config)
  # No guidance: every stage's scale is 1.0 (one pass), so all models pay the same per step.
  config_lib.set_schedule(c, num_stages, (1.0,) * num_stages)
  if finetune:
    steps = finetune_steps(config)
    c.train.update(steps=steps, ema_decay=config.mini_repro.finetune_ema_decay,
                   warmup_steps=steps // 4)
  return config_lib.resolve(c)


def train_models(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """SiT for sit_steps, then PPF-2/3 from its EMA for finetune_steps -> {stages: Inference of
  the EMA weights}, plus {0: ...} for the untrained SiT. Finished runs are reloaded, not redone."""
  models, seconds = {}, {}
  t0 = time.time()
  sit_cfg = make_config(config, 1, finetune=False)
  trainer, state = loop.train_and_evaluate(sit_cfg, paths.join(workdir, _DIRS[1]))
  models[1] = inference.Inference.from_trainer(trainer, state.ema, step=state.step)
  models[0] = inference.Inference.from_trainer(trainer, trainer.init_state().ema)
  seconds['sit'] = time.time() - t0
  sit_ema = jax.device_get(state.ema)
  for stages in (2, 3):
    t0 = time.time()
    cfg = make_config(config, stages, finetune=True)
    init_dir = paths.join(workdir, f'{_DIRS[stages]}_init')
    if not paths.isdir(paths.join(init_dir, checkpoint.PARAMS_DIR)):
      checkpoint.save_params(init_dir, init_from_sit(sit_ema, cfg), cfg)
    cfg.train.init_from = init_dir
    trainer, state = loop.train_and_evaluate(cfg, paths.join(workdir, _DIRS[stages]))
    models[stages] = inference.Inference.from_trainer(trainer, state.ema, step=state.step)
    seconds[_DIRS[stages]] = time.time() - t0
  return models, seconds


def sample_interleaved(config: ml_collections.ConfigDict, models: dict,
                       seed: int) -> tuple[dict, dict, np.ndarray]:
  """Samples config.eval.num_samples images per model, batch by batch in turn (same noise and
  labels for all) -> ({stages: images (N, 32, 32, 1) in [-1, 1]}, {stages: [seconds per timed
  batch]}, labels (N,)). Label i = i mod 10, so every prefix is class-balanced."""
  n, bs = config.eval.num_samples, config.sample.batch_size
  if n % bs or n // bs < 2:
    raise errors.UserError(f'config.eval.num_samples={n} must be a multiple (>= 2x) of '
                           f'config.sample.batch_size={bs}: the first batch compiles and is not '
                           'timed')
  labels = (np.arange(n) % 10).astype(np.int32)
  # the untrained SiT shares the SiT's compiled programs
  samplers = {k: model.sampler() for k, model in models.items() if k != 0}
  samplers[0] = samplers[1]
  outs = {k: [] for k in models}
  times = {k: [] for k in models}
  for b in range(n // bs):
    idx = np.arange(b * bs, (b + 1) * bs)
    for k, model in models.items():
      if k == 0 and b * bs >= config.mini_repro.floor_samples:
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


def evaluate(config: ml_collections.ConfigDict, workdir: str, models: dict,
             seconds: dict) -> dict:
  """Samples, scores and times every model -> the results dict (also written as JSON)."""
  mr = config.mini_repro
  evaluator = fmnist_features.FMNISTEvaluator(
      paths.join(workdir, 'fmnist_classifier'),
      train_steps=mr.classifier_steps or fmnist_features.DEFAULT_TRAIN_STEPS)
  t0 = time.time()
  images, times, labels = sample_interleaved(config, models, seed=1234)
  seconds['sampling'] = time.time() - t0
  nf = mr.floor_samples
  sit_steps, ft_steps = config.train.steps, finetune_steps(config)
  rows = []
  for k, model in models.items():
    x = np.clip(images[k], -1.0, 1.0)
    row = dict(model='untrained SiT' if k == 0 else list(MODELS)[k - 1], stages=max(k, 1),
               train_steps=0 if k == 0 else (sit_steps if k == 1 else sit_steps + ft_steps),
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
      rows=rows, config=config.to_dict(), finetune_steps=ft_steps, floor_samples=nf,
      sampler=f'{cfg.sample.method}, {cfg.sample.num_steps} grid points, no guidance',
      num_samples=config.eval.num_samples, sample_batch=config.sample.batch_size,
      classifier_test_accuracy=evaluator.test_accuracy, phase_seconds=seconds,
      device=f'{jax.devices()[0].device_kind} x{jax.device_count()} ({os.cpu_count()} cores)',
      jax_version=jax.__version__, code_version=sample_lib.code_version())
  nrow = 10
  grids = [report.to_uint8(np.clip(images[k][:3 * nrow], -1, 1)) for k in sorted(models)]
  report.save_grid(np.concatenate(grids), paths.join(workdir, 'samples.png'), nrow, scale=2)
  return result


def markdown(result: dict) -> str:
  """The results table (Markdown)."""
  timed = next(r['timed_batches'] for r in result['rows'] if 'timed_batches' in r)
  # Results written before configs/mini_repro.py (docs/mini_repro_*.json) keep it in 'recipe'.
  floor = result.get('floor_samples') or result['recipe']['floor_samples']
  lines = [
      f'Sampler: {result["sampler"]}; {result["num_samples"]} samples per model (labels i mod '
      f'10), same noise for every model; time = median over {timed} '
      f'batches of {result["sample_batch"]} after a compile batch, models interleaved; '
      f'{result["device"]}.', '',
      f'| model | train steps | FID | precision | recall | s / batch of {result["sample_batch"]} |'
      f' speed-up | testing FLOPs | FID@{floor} |',
      '|---|---|---|---|---|---|---|---|---|']
  sit_steps = min(r['train_steps'] for r in result['rows'] if r['train_steps'])  # the SiT's
  for r in result['rows']:
    model = r['model'].replace('|', '\\|')  # a literal bar inside a Markdown cell
    if 'fid' in r:
      steps = (f'{sit_steps} + {r["train_steps"] - sit_steps}' if r['train_steps'] > sit_steps
               else str(r['train_steps']))  # fine-tunes: the SiT's steps + their own
      lines.append(f'| {model} | {steps} | {r["fid"]:.2f} | {r["precision"]:.3f}'
                   f' | {r["recall"]:.3f} | {r["seconds_per_batch"]:.2f} | {r["speedup"]:.2f}x |'
                   f' {100 * r["flops_ratio"]:.1f}% | {r["fid_floor_n"]:.2f} |')
    else:
      lines.append(f'| {model} | 0 | | | | | | | {r["fid_floor_n"]:.2f} |')
  lines += ['', f'FID / precision / recall: Fashion-MNIST classifier features (test accuracy '
            f'{result["classifier_test_accuracy"]:.3f}) vs the 10k test images; not Inception FID. '
            f'FID@{floor}: the first {floor} samples only (for the untrained floor).', '']
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
  report.save_figure(fig, path, dpi=110)


def run(workdir: str, config: ml_collections.ConfigDict) -> dict:
  """Trains, samples and scores the three models of `config` (configs/mini_repro.py); writes
  results.{json,md} and the plots."""
  paths.makedirs(workdir)
  start = time.time()
  models, seconds = train_models(config, workdir)
  result = evaluate(config, workdir, models, seconds)
  result['total_seconds'] = time.time() - start
  write_results(result, workdir)
  return result


def write_results(result: dict, workdir: str) -> None:
  """results.json, results.md and fid_vs_time.png in `workdir` (a local path or a URL)."""
  paths.write_text(paths.join(workdir, 'results.json'), json.dumps(result, indent=2))
  paths.write_text(paths.join(workdir, 'results.md'), markdown(result))
  plot(result, paths.join(workdir, 'fid_vs_time.png'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  result = run(f.workdir, f.config)
  print(markdown(result))
  print(f'total {result["total_seconds"]:.0f} s; results in {f.workdir}')


def define_flags() -> None:
  """The command line's flags (defined under `__main__` only: this module is also a library)."""
  flags.DEFINE_string('workdir', None, 'Where models, samples and results go.')
  config_flags.DEFINE_config_file(
      'config', config_lib.find_config('mini_repro'), 'The recipe: configs/mini_repro.py (full '
      'run) or mini_repro:quick (1-2 min smoke test); overrides with --config.x=y.',
      lock_config=True)
  flags.mark_flag_as_required('workdir')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
