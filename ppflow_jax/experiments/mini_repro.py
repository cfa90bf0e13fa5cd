"""The paper's claim in miniature on Fashion-MNIST (32x32x1), on a CPU.

  python -m ppflow_jax.experiments.mini_repro --workdir=/tmp/mini_repro  # full run, ~25 min
  python -m ppflow_jax.experiments.mini_repro --workdir=/tmp/mini_quick \
      --config=mini_repro:quick                                        # smoke test, 1-2 min
  python -m ppflow_jax.experiments.mini_repro --workdir=/tmp/mini_converged \
      --config=mini_repro:converged                     # SiT to its plateau: hours, resumable

The recipe is configs/mini_repro.py (`--config.train.steps=4000`, ... override it): paper §3.3 /
§4, shrunk. Train a SiT baseline (one stage, 2x2 patches) for N steps, or (mini_repro.plateau_every
> 0) in chunks until its loss and FID plateau; then, for each seed of mini_repro.seeds, initialise
PPF-2 (4x4 | 2x2, boundary 0.5) and PPF-3 (4x4 | 2x4 | 2x2, boundaries 0.5 / 0.75; every patch side
times mini_repro.patch_scale, 2 in the converged mode) from its EMA weights with the paper's
initialisation (convert/init_from_sit.py) and fine-tune each for every fraction of N in
mini_repro.finetune_fractions; the initialised PPFs before fine-tuning are rows too. Then all
models (and, as a floor, the untrained SiT) sample the same noise and labels with the same sampler,
batch by batch and interleaved, so the measured sampling times share the machine's load; the first
batch (compilation) is not timed and the median over the other batches is reported. Quality is FID
/ precision / recall in the feature space of the Fashion-MNIST classifier
(evaluation/fmnist_features.py) against the 10k test images, next to the analytic testing-FLOPs
ratio (flops.py).

Writes to --workdir: sit/ (with plateau.json in the converged mode),
ppf{2,3}_sit<N>_init_s<seed>/, ppf{2,3}_sit<N>_ft<steps>_s<seed>/ (N: the SiT's steps, so a SiT
trained further never reuses an old initialisation; training workdirs: a rerun resumes),
results.json, results.md,
fid_vs_time.png and samples.png.
"""

from __future__ import annotations

import copy
import json
import os
import time
import typing

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging
from flax import traverse_util
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
from ppflow_jax import sharding
from ppflow_jax import summary
from ppflow_jax.convert import init_from_sit
from ppflow_jax.evaluation import fmnist_features
from ppflow_jax.evaluation import sample as sample_lib



# Number of stages -> the model's name in config_lib.PAPER_MODELS (its workdirs' prefix); stage
# count 0 is the untrained SiT.
_DIRS = {stages: name for name, (_, stages) in config_lib.PAPER_MODELS.items()}
PLATEAU = 'plateau.json'  # the SiT workdir's plateau history: [{step, loss, fid}]
SAMPLE_SEED = 1234        # sampling noise of the results' rows (the same for every model)
PLATEAU_SEED = 4321       # sampling noise of the plateau checks
PLATEAU_FID_DRAWS = 20    # bootstrap resamples that measure a plateau check's FID noise


class Key(typing.NamedTuple):
  """One model of the experiment: `stages` (0: the untrained SiT), its fine-tuning steps after
  the SiT's (0: the SiT, or a PPF right after its initialisation) and its training seed."""
  stages: int
  finetune_steps: int
  seed: int


def finetune_steps(sit_steps: int, fraction: float) -> int:
  """PPF fine-tuning steps: `fraction` of the SiT's `sit_steps` (at least one)."""
  return max(1, int(sit_steps * fraction))


def make_config(config: ml_collections.ConfigDict, num_stages: int, *, finetune_steps: int = 0,
                seed: int | None = None) -> ml_collections.ConfigDict:
  """The mini reproduction's `config` (configs/mini_repro.py, the SiT's) with the paper's
  `num_stages` schedule, no guidance, and with `finetune_steps` > 0 the PPF fine-tuning fields;
  `seed` (default config.seed) drives data order, noise and the fresh level embedding. Resolved."""
  c = copy.deepcopy(config)
  # No guidance: every stage's scale is 1.0 (one pass), so all models pay the same per step.
  config_lib.set_schedule(c, num_stages, (1.0,) * num_stages,
                          patch_scale=config.mini_repro.patch_scale)
  if finetune_steps:
    mr = config.mini_repro
    c.train.update(steps=finetune_steps, ema_decay=mr.finetune_ema_decay,
                   warmup_steps=int(finetune_steps * mr.finetune_warmup_fraction),
                   lr=mr.finetune_lr or config.train.lr)
  if seed is not None:
    c.seed = seed
  return config_lib.resolve(c)


def check_recipe(config: ml_collections.ConfigDict) -> None:
  """One line per bad config.mini_repro field (before anything trains)."""
  mr = config.mini_repro
  if not mr.seeds or not mr.finetune_fractions:
    raise errors.UserError('config.mini_repro.seeds and .finetune_fractions must each name at '
                           'least one value, e.g. --config.mini_repro.seeds="(0, 1)"')
  if any(not 0 < f for f in mr.finetune_fractions):
    raise errors.UserError(f'config.mini_repro.finetune_fractions={tuple(mr.finetune_fractions)}'
                           ' must be > 0 (the init-only rows are always added)')
  if not 0 <= mr.finetune_warmup_fraction < 1 or mr.finetune_lr < 0:
    raise errors.UserError(
        f'config.mini_repro: finetune_warmup_fraction={mr.finetune_warmup_fraction} must be in '
        f'[0, 1) and finetune_lr={mr.finetune_lr} >= 0 (0: the SiT\'s config.train.lr)')
  if mr.patch_scale not in (1, 2, 4):
    raise errors.UserError(f'config.mini_repro.patch_scale={mr.patch_scale!r} must be 1, 2 or 4 '
                           '(each side of every paper patch is multiplied by it)')
  if mr.plateau_every and (mr.max_steps < mr.plateau_every or mr.patience < 1
                          or mr.plateau_noise < 0 or mr.plateau_samples < 2):
    raise errors.UserError(
        f'config.mini_repro: max_steps={mr.max_steps} must be >= plateau_every='
        f'{mr.plateau_every}, patience={mr.patience} >= 1, plateau_noise={mr.plateau_noise} '
        f'>= 0 and plateau_samples={mr.plateau_samples} >= 2 (or plateau_every=0: train '
        'config.train.steps with no plateau loop)')


def train_models(config: ml_collections.ConfigDict, workdir: str,
                 evaluator: fmnist_features.FMNISTEvaluator) -> tuple[dict, dict, list]:
  """The SiT (for config.train.steps, or until its plateau with config.mini_repro.plateau_every),
  then per seed and fine-tuning fraction PPF-2/3 from its EMA -> ({Key: Inference of the EMA
  weights}, {phase: seconds}, plateau history). The untrained SiT and the initialised PPFs (no
  fine-tuning) are rows too. Finished runs are reloaded, not redone."""
  mr = config.mini_repro
  models, seconds = {}, {}
  t0 = time.time()
  trainer, state, history = train_sit(config, paths.join(workdir, _DIRS[1]), evaluator)
  sit_steps = int(jax.device_get(state.step))
  models[Key(1, 0, config.seed)] = inference.Inference.from_trainer(trainer, state.ema,
                                                                    step=sit_steps)
  models[Key(0, 0, config.seed)] = inference.Inference.from_trainer(trainer,
                                                                    trainer.init_state().ema)
  seconds['sit'] = time.time() - t0
  sit_ema = jax.device_get(state.ema)
  for seed in mr.seeds:
    for stages in (2, 3):
      cfg = make_config(config, stages, seed=seed)
      prefix = f'{_DIRS[stages]}_sit{sit_steps}'  # from this SiT only (it may be extended)
      init_dir = paths.join(workdir, f'{prefix}_init_s{seed}')
      if not paths.isdir(paths.join(init_dir, checkpoint.PARAMS_DIR)):
        checkpoint.save_params(init_dir, init_from_sit(sit_ema, cfg), cfg)
      models[Key(stages, 0, seed)] = inference.Inference.from_params(
          cfg, checkpoint.load_params(init_dir, cfg, sharding.make_mesh(cfg)), step=sit_steps)
      for fraction in mr.finetune_fractions:
        t0 = time.time()
        steps = finetune_steps(sit_steps, fraction)
        cfg = make_config(config, stages, finetune_steps=steps, seed=seed)
        cfg.train.init_from = init_dir
        name = f'{prefix}_ft{steps}_s{seed}'
        trainer, state = loop.train_and_evaluate(cfg, paths.join(workdir, name))
        models[Key(stages, steps, seed)] = inference.Inference.from_trainer(
            trainer, state.ema, step=sit_steps + steps)
        seconds[name] = time.time() - t0
  return models, seconds, history


def train_sit(config: ml_collections.ConfigDict, workdir: str,
              evaluator: fmnist_features.FMNISTEvaluator) -> tuple:
  """The SiT baseline -> (trainer, state, plateau history). Without config.mini_repro.plateau_every
  it trains config.train.steps. With it, it trains in chunks of plateau_every steps up to
  max_steps; after each chunk the EMA's FID on plateau_samples images (with its bootstrap
  noise) and the chunk's mean training loss (metrics.jsonl, with its standard error) are appended to
  workdir/plateau.json (a rerun resumes from it), and training stops once neither improved over
  the last `patience` chunks (`plateaued`)."""
  mr = config.mini_repro
  if not mr.plateau_every:
    return (*loop.train_and_evaluate(make_config(config, 1), workdir), [])
  record = paths.join(workdir, PLATEAU)
  history = json.loads(paths.read_text(record)) if paths.exists(record) else []
  while True:
    done = history[-1]['step'] if history else 0
    stop = done >= mr.max_steps or plateaued(history, mr.patience, mr.plateau_tol,
                                             mr.plateau_noise)
    cfg = make_config(config, 1)
    cfg.train.steps = done if stop else min(done + mr.plateau_every, mr.max_steps)
    trainer, state = loop.train_and_evaluate(cfg, workdir)  # at `done`: reloads the checkpoint
    if stop:
      return trainer, state, history
    model = inference.Inference.from_trainer(trainer, state.ema, step=state.step)
    labels = (np.arange(mr.plateau_samples) % 10).astype(np.int32)
    images = np.clip(np.asarray(model.generate(labels, seed=PLATEAU_SEED)), -1.0, 1.0)
    scores = evaluator.score(images, labels, fid_draws=PLATEAU_FID_DRAWS)
    loss, loss_std = chunk_loss(workdir, done, cfg.train.steps)
    history.append(dict(step=cfg.train.steps, loss=loss, loss_std=loss_std,
                        fid=scores['fid'], fid_std=scores['fid_std']))
    logging.info('plateau check at step %d: %s', cfg.train.steps, history[-1])
    paths.write_text(record, json.dumps(history, indent=2))


def chunk_loss(workdir: str, start: int, end: int) -> tuple[float, float]:
  """(mean, standard error of the mean) of the training losses in the metrics.jsonl records with
  start < step <= end (each record is one step's batch loss; 0.0 error from a single record)."""
  records = summary.read_records(paths.join(workdir, summary.METRICS))
  losses = [r['loss'] for r in records if start < r['step'] <= end]
  if not losses:
    raise errors.UserError(f'{workdir}/{summary.METRICS} has no loss between steps {start} and '
                           f'{end}; lower config.train.log_every below mini_repro.plateau_every')
  std_error = np.std(losses, ddof=1) / np.sqrt(len(losses)) if len(losses) > 1 else 0.0
  return float(np.mean(losses)), float(std_error)


def plateaued(history: list[dict], patience: int, tol: float, noise: float = 0.0) -> bool:
  """True when neither the loss nor the FID of the last `patience` chunks improved on the best
  before them by more than the larger of the relative tolerance `tol` and `noise` times the best
  recent check's own noise: the standard error of its chunk's mean loss ('loss_std') and its
  FID's bootstrap std ('fid_std'), the change one chunk's batches or one check's sample alone
  can make (0 where not recorded: then `tol` alone decides)."""
  if len(history) <= patience:
    return False
  before, recent = history[:-patience], history[-patience:]
  def improved(key):
    best = min(h[key] for h in before)
    best_recent = min(recent, key=lambda h: h[key])
    gain = best - best_recent[key]
    return gain > max(tol * abs(best), noise * best_recent.get(f'{key}_std', 0.0))
  return not (improved('loss') or improved('fid'))


# Per-stage parameter lists (index 0: the coarsest stage) and how the weight-change table names
# them; every other top-level entry is one group.
_STAGE_GROUPS = {'x_embedders': 'embed', 'final_linears': 'de-embed'}


def param_change(init: dict, tuned: dict) -> dict[str, float]:
  """How far fine-tuning moved each part of a PPF: {group: ||tuned - init|| / ||init||} over
  the group's arrays (pure-dict params of the same model). Groups: 'blocks' (the shared DiT
  blocks), 'embed[i]' / 'de-embed[i]' (stage i's patchify / unpatchify linears), and the other
  top-level entries (level_embedder, t_embedder, y_embedder, final_modulation)."""
  sums = {}
  tuned = traverse_util.flatten_dict(tuned)
  for path, a in traverse_util.flatten_dict(init).items():
    name = path[0]
    group = f'{_STAGE_GROUPS[name]}[{path[1]}]' if name in _STAGE_GROUPS else name
    a, b = np.asarray(a, np.float64), np.asarray(tuned[path], np.float64)
    moved, size = sums.get(group, (0.0, 0.0))
    sums[group] = (moved + np.sum((b - a) ** 2), size + np.sum(a ** 2))
  return {g: float(np.sqrt(m / s)) if s else float('nan') for g, (m, s) in sums.items()}


def sample_interleaved(config: ml_collections.ConfigDict, models: dict,
                       seed: int) -> tuple[dict, dict, np.ndarray]:
  """Samples config.eval.num_samples images per model, batch by batch in turn (same noise and
  labels for all; the untrained SiT only config.mini_repro.floor_samples) -> ({Key: images
  (N, 32, 32, 1) in [-1, 1]}, {Key: [seconds per timed batch]}, labels (N,)). Label i = i mod 10,
  so every prefix is class-balanced."""
  n, bs = config.eval.num_samples, config.sample.batch_size
  if n % bs or n // bs < 2:
    raise errors.UserError(f'config.eval.num_samples={n} must be a multiple (>= 2x) of '
                           f'config.sample.batch_size={bs}: the first batch compiles and is not '
                           'timed')
  labels = (np.arange(n) % 10).astype(np.int32)
  # One compiled sampler per schedule (it takes the params as an argument); the untrained SiT
  # uses the SiT's.
  samplers = {}
  for k, model in models.items():
    samplers.setdefault(max(k.stages, 1), model.sampler())
  outs = {k: [] for k in models}
  times = {k: [] for k in models}
  for b in range(n // bs):
    idx = np.arange(b * bs, (b + 1) * bs)
    for k, model in models.items():
      if k.stages == 0 and b * bs >= config.mini_repro.floor_samples:
        continue
      noise, keys = sampling.index_noise(model.latent_shape, idx, seed)
      y = jax.numpy.asarray(labels[idx])
      jax.block_until_ready((noise, keys, y))
      t0 = time.perf_counter()
      x = jax.block_until_ready(samplers[max(k.stages, 1)].sample(model.params, noise, y, keys))
      if b:  # batch 0 compiles
        times[k].append(time.perf_counter() - t0)
      outs[k].append(np.asarray(x))
    logging.info('sampled batch %d/%d', b + 1, n // bs)
  return {k: np.concatenate(v) for k, v in outs.items()}, times, labels


def evaluate(config: ml_collections.ConfigDict, workdir: str, models: dict, seconds: dict,
             evaluator: fmnist_features.FMNISTEvaluator) -> dict:
  """Samples, scores and times every model -> the results dict (also written as JSON)."""
  t0 = time.time()
  images, times, labels = sample_interleaved(config, models, seed=SAMPLE_SEED)
  seconds['sampling'] = time.time() - t0
  nf = config.mini_repro.floor_samples
  sit_steps = models[Key(1, 0, config.seed)].step
  rows = []
  finest_samplers = {}  # stages -> one finest-only sampler per schedule (params are an argument)
  for k, model in models.items():
    x = np.clip(images[k], -1.0, 1.0)
    row = dict(model='untrained SiT' if k.stages == 0 else config_lib.model_label(
        _DIRS[k.stages], patches=True, patch_scale=config.mini_repro.patch_scale),
               stages=max(k.stages, 1), train_steps=model.step, finetune_steps=k.finetune_steps,
               seed=k.seed, fid_floor_n=evaluator.score(x[:nf], labels[:nf])['fid'])
    if k.stages:
      scores = evaluator.score(x, labels[:len(x)])
      spec = model.sampler().spec
      row.update(fid=scores['fid'], precision=scores['precision'], recall=scores['recall'],
                 label_accuracy=scores['accuracy_of_labels'],
                 seconds_per_batch=float(np.median(times[k])), timed_batches=len(times[k]),
                 flops_ratio=float(flops.testing_flops_ratio(model.config, spec)),
                 evaluations=sampling.num_evaluations(model.schedule, spec))
    if k.stages > 1 and k.finetune_steps:  # against the same seed's initialised PPF
      init = models[k._replace(finetune_steps=0)].params
      row['param_change'] = param_change(jax.device_get(init), jax.device_get(model.params))
      # The same weights at the finest patch for every t, same noise as the rows: what the
      # shared blocks still do as a SiT (this also counts what the finest stage forgets at the
      # coarse stages' t, where fine-tuning no longer trains it).
      sampler = finest_samplers.setdefault(k.stages, model.sampler(force_finest=True))
      finest, _ = sampling.sample_in_chunks(sampler, model.params, model.latent_shape,
                                            labels[:len(x)], SAMPLE_SEED,
                                            config.sample.batch_size)
      row['fid_finest_only'] = evaluator.score(np.clip(np.asarray(finest), -1.0, 1.0),
                                               labels[:len(x)])['fid']
    rows.append(row)
  base = next(r for r in rows if r['stages'] == 1 and r['train_steps'])
  for r in rows:
    if 'seconds_per_batch' in r:
      r['speedup'] = base['seconds_per_batch'] / r['seconds_per_batch']
  cfg = models[Key(1, 0, config.seed)].config
  mr = config.mini_repro
  result = dict(
      rows=rows, config=config.to_dict(), sit_steps=sit_steps,
      finetune_steps=[finetune_steps(sit_steps, f) for f in mr.finetune_fractions],
      seeds=list(mr.seeds), floor_samples=nf,
      sampler=f'{cfg.sample.method}, {cfg.sample.num_steps} grid points, no guidance',
      num_samples=config.eval.num_samples, sample_batch=config.sample.batch_size,
      classifier_test_accuracy=evaluator.test_accuracy, phase_seconds=seconds,
      device=f'{jax.devices()[0].device_kind} x{jax.device_count()} ({os.cpu_count()} cores)',
      jax_version=jax.__version__, code_version=sample_lib.code_version())
  nrow = 10
  grids = [report.to_uint8(np.clip(images[k][:3 * nrow], -1, 1)) for k in sorted(models)]
  report.save_grid(np.concatenate(grids), paths.join(workdir, 'samples.png'), nrow, scale=2)
  return result


def seed_groups(rows: list[dict]) -> dict[tuple, list[dict]]:
  """(model, train steps, fine-tuning steps) -> its rows over seeds, in row order."""
  groups = {}
  for r in rows:
    groups.setdefault((r['model'], r['train_steps'], r.get('finetune_steps')), []).append(r)
  return groups


def _cell(rows: list[dict], key: str, fmt: str) -> str:
  """One table cell: the value, or over several seeds 'mean ± half the range'."""
  values = [r[key] for r in rows]
  if len(values) == 1:
    return format(values[0], fmt)
  return f'{format(np.mean(values), fmt)} ± {format((max(values) - min(values)) / 2, fmt)}'


def markdown(result: dict) -> str:
  """The results table (Markdown): one line per model and training budget (over seeds: mean ±
  half the range), then the SiT's plateau history if it has one."""
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
  for (name, train_steps, ft), rows in seed_groups(result['rows']).items():
    model = name.replace('|', '\\|')  # a literal bar inside a Markdown cell
    floor_fid = _cell(rows, 'fid_floor_n', '.2f')
    if 'fid' not in rows[0]:
      lines.append(f'| {model} | 0 | | | | | | | {floor_fid} |')
      continue
    # fine-tunes: the SiT's steps + their own (+ 0: the initialised PPF)
    steps = (f'{sit_steps} + {train_steps - sit_steps}'
             if train_steps > sit_steps or (ft is not None and rows[0]['stages'] > 1)
             else str(train_steps))
    lines.append(f'| {model} | {steps} | {_cell(rows, "fid", ".2f")} | '
                 f'{_cell(rows, "precision", ".3f")} | {_cell(rows, "recall", ".3f")} | '
                 f'{_cell(rows, "seconds_per_batch", ".2f")} | {_cell(rows, "speedup", ".2f")}x |'
                 f' {100 * rows[0]["flops_ratio"]:.1f}% | {floor_fid} |')
  lines += ['', f'FID / precision / recall: Fashion-MNIST classifier features (test accuracy '
            f'{result["classifier_test_accuracy"]:.3f}) vs the 10k test images; not Inception FID. '
            f'FID@{floor}: the first {floor} samples only (for the untrained floor).', '']
  if len(result.get('seeds', ())) > 1:
    lines += [f'PPF rows: mean ± half the range over the fine-tuning seeds {result["seeds"]} '
              '(data order, training noise, fresh level embedding); "+ 0" is the initialised '
              'PPF before any fine-tuning. The SiT and the sampling noise are shared.', '']
  lines += change_table(result['rows'])
  if result.get('plateau'):
    lines += plateau_lines(result)
  return '\n'.join(lines)


def plateau_lines(result: dict) -> list[str]:
  """Markdown lines: the SiT's plateau history (result['plateau'], ['plateau_every'],
  ['plateau_stop'] as written by plateau_summary)."""
  lines = ['| SiT step | mean training loss of the chunk | its standard error | FID (EMA) '
           '| FID bootstrap std |', '|---|---|---|---|---|']
  def cell(h, key, fmt):  # histories written before a noise was recorded lack it
    return format(h[key], fmt) if key in h else '-'
  lines += [f'| {h["step"]} | {h["loss"]:.4f} | {cell(h, "loss_std", ".4f")} | {h["fid"]:.2f} | '
            f'{cell(h, "fid_std", ".2f")} |' for h in result['plateau']]
  return lines + ['', f'SiT plateau check every {result["plateau_every"]} steps: '
                  f'{result["plateau_stop"]}.', '']


def plateau_summary(config: ml_collections.ConfigDict, history: list[dict]) -> dict:
  """The results' plateau fields: the history, the check interval and why training stopped."""
  mr = config.mini_repro
  reached = plateaued(history, mr.patience, mr.plateau_tol, mr.plateau_noise)
  return dict(plateau=history, plateau_every=mr.plateau_every, plateau_stop=(
      f'loss and FID did not improve by more than the larger of {100 * mr.plateau_tol:g}% and '
      f'{mr.plateau_noise:g}x their noise (the loss\'s standard error, the FID\'s bootstrap '
      f'std) over the last {mr.patience} checks' if reached
      else f'max_steps={mr.max_steps} reached before a plateau'))


def change_table(rows: list[dict]) -> list[str]:
  """Markdown lines: per fine-tuned PPF (mean over seeds) its FID at the finest patch only and
  how far each weight group moved from the initialisation; none for results without them."""
  groups = {(model, ft): rs for (model, _, ft), rs in seed_groups(rows).items()
            if 'param_change' in rs[0]}
  if not groups:
    return []
  order = ('blocks', 'embed', 'de-embed', 'final_modulation', 'level_embedder', 't_embedder',
           'y_embedder')
  names = sorted({g for rs in groups.values() for r in rs for g in r['param_change']},
                 key=lambda g: (order.index(g.split('[')[0]), g))
  lines = ['Where fine-tuning goes (mean over seeds): FID of the same weights sampled at the '
           'finest patch for every t (same noise), and per weight group ||EMA - init|| / ||init|| '
           '(stage 0 is the coarsest; level_embedder starts fresh).', '',
           '| model | fine-tuning steps | FID finest only | ' + ' | '.join(names) + ' |',
           '|---|---|---|' + '---|' * len(names)]
  for (model, ft), rs in groups.items():
    finest = [r['fid_finest_only'] for r in rs if 'fid_finest_only' in r]
    cells = [f'{np.mean(finest):.2f}' if finest else '']
    for g in names:
      moved = [r['param_change'][g] for r in rs if g in r['param_change']]
      cells.append(f'{np.mean(moved):.3f}' if moved else '')
    model = model.replace('|', '\\|')  # a literal bar inside a Markdown cell
    lines.append(f'| {model} | {ft} | ' + ' | '.join(cells) + ' |')
  return lines + ['']


def recipe_table(results: list[dict]) -> str:
  """Markdown: the fine-tuning recipes of several runs on the same SiT side by side (one line
  per run: peak lr, warm-up, EMA decay; FID / recall of each PPF at the run's shortest
  fine-tune, first seed), after a line with the SiT's own scores."""
  sit = next(r for r in results[0]['rows'] if r['stages'] == 1 and r['train_steps'])
  lines = [f'The SiT they start from ({sit["train_steps"]} steps): FID {sit["fid"]:.2f}, '
           f'recall {sit["recall"]:.3f}.', '',
           '| fine-tuning lr | warm-up | EMA decay | steps | PPF-2 FID | PPF-2 recall | '
           'PPF-3 FID | PPF-3 recall |', '|---|---|---|---|---|---|---|---|']
  for result in results:
    mr, train = result['config']['mini_repro'], result['config']['train']
    steps, seed = min(result['finetune_steps']), result['seeds'][0]
    cells = []
    for stages in (2, 3):
      row = next(r for r in result['rows'] if (r['stages'], r['finetune_steps'], r['seed'])
                 == (stages, steps, seed))
      cells += [f'{row["fid"]:.2f}', f'{row["recall"]:.3f}']
    lines.append(f'| {mr["finetune_lr"] or train["lr"]:g} | '
                 f'{100 * mr["finetune_warmup_fraction"]:g}% | '
                 f'{mr["finetune_ema_decay"]:g} | {steps} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(result: dict, path: str) -> None:
  """FID (log scale) against measured seconds per batch: one point per model and training
  budget, over seeds the mean with bars spanning the range."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for (name, _, ft), rows in seed_groups(result['rows']).items():
    if 'fid' not in rows[0]:
      continue
    fid = np.array([r['fid'] for r in rows])
    sec = np.array([r['seconds_per_batch'] for r in rows])
    ax.errorbar(sec.mean(), fid.mean(), fmt='o',
                yerr=[[fid.mean() - fid.min()], [fid.max() - fid.mean()]],
                xerr=[[sec.mean() - sec.min()], [sec.max() - sec.mean()]])
    label = name.split(' ')[0] + (f' +{ft}' if ft is not None and rows[0]['stages'] > 1 else '')
    # Labels of one model's budgets sit close together: PPF-3's go to the left of their point,
    # those of fine-tunes longer than the shortest below it.
    left = rows[0]['stages'] == 3
    below = bool(ft) and ft > min(result.get('finetune_steps') or [ft])
    ax.annotate(f'{label} ({100 * rows[0]["flops_ratio"]:.0f}% FLOPs)', (sec.mean(), fid.mean()),
                textcoords='offset points', xytext=(-6 if left else 6, -11 if below else 4),
                ha='right' if left else 'left', fontsize=8)
  ax.set_yscale('log')
  ax.set_xlabel(f'sampling seconds per batch of {result["sample_batch"]}')
  ax.set_ylabel('FID (Fashion-MNIST features, log scale)')
  ax.set_title('Mini reproduction: quality vs sampling time')
  ax.margins(y=0.2)
  ax.set_xlim(0, ax.get_xlim()[1] * 1.15)  # from 0: time ratios read off the axis
  fig.tight_layout()
  report.save_figure(fig, path, dpi=110)


def make_evaluator(config: ml_collections.ConfigDict,
                   workdir: str) -> fmnist_features.FMNISTEvaluator:
  """The Fashion-MNIST feature scorer, its classifier trained once into workdir (then reloaded)."""
  return fmnist_features.FMNISTEvaluator(
      paths.join(workdir, 'fmnist_classifier'),
      train_steps=config.mini_repro.classifier_steps or fmnist_features.DEFAULT_TRAIN_STEPS)


def run(workdir: str, config: ml_collections.ConfigDict) -> dict:
  """Trains, samples and scores the models of `config` (configs/mini_repro.py); writes
  results.{json,md} and the plots."""
  check_recipe(config)
  paths.makedirs(workdir)
  start = time.time()
  evaluator = make_evaluator(config, workdir)
  models, seconds, history = train_models(config, workdir, evaluator)
  result = evaluate(config, workdir, models, seconds, evaluator)
  if config.mini_repro.plateau_every:
    result.update(plateau_summary(config, history))
  result['total_seconds'] = time.time() - start
  write_results(result, workdir)
  return result


def only_sit(workdir: str, config: ml_collections.ConfigDict) -> dict:
  """Trains (or extends) only the SiT's plateau loop of `config` in workdir/sit -> its plateau
  summary: how converged the baseline is, without the fine-tunes (a larger max_steps continues
  a finished run from its last check)."""
  check_recipe(config)
  if not config.mini_repro.plateau_every:
    raise errors.UserError('--only_sit needs the plateau loop: set config.mini_repro.'
                           'plateau_every > 0 (e.g. --config=mini_repro:converged)')
  _, _, history = train_sit(config, paths.join(workdir, _DIRS[1]),
                            make_evaluator(config, workdir))
  return plateau_summary(config, history)


def write_results(result: dict, workdir: str) -> None:
  """results.json, results.md and fid_vs_time.png in `workdir` (a local path or a URL)."""
  paths.write_text(paths.join(workdir, 'results.json'), json.dumps(result, indent=2))
  paths.write_text(paths.join(workdir, 'results.md'), markdown(result))
  plot(result, paths.join(workdir, 'fid_vs_time.png'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.only_sit:
    print('\n'.join(plateau_lines(only_sit(f.workdir, f.config))))
    return
  result = run(f.workdir, f.config)
  print(markdown(result))
  print(f'total {result["total_seconds"]:.0f} s; results in {f.workdir}')


def define_flags() -> None:
  """The command line's flags (defined under `__main__` only: this module is also a library)."""
  flags.DEFINE_string('workdir', None, 'Where models, samples and results go.')
  config_flags.DEFINE_config_file(
      'config', config_lib.find_config('mini_repro'), 'The recipe: configs/mini_repro.py (full '
      'run), mini_repro:quick (1-2 min smoke test), mini_repro:converged (SiT to its plateau); '
      'overrides with --config.x=y.',
      lock_config=True)
  flags.DEFINE_bool('only_sit', False, 'Train or extend only the SiT baseline to its plateau '
                    '(the converged recipes) and print its history; no fine-tunes, no results.')
  flags.mark_flag_as_required('workdir')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
