"""The side-by-side comparison of token-reduction methods on the embedded Fashion-MNIST default.

Trains PPF-2 (configs/default.py), FlexiDiT-style and Lumina-style regimes of the same model
(configs/default_flexidit.py, default_lumina.py) and a tiny MPDiT (configs/default_mpdit.py) for
the same number of steps with the same data, optimizer and sampler, then scores each with the
Fashion-MNIST FID (evaluation/fmnist_features.py) and times sampling. Two sampling-only rows reuse
trained weights: FlexiDiT's weak-model guidance, and PPF-2 forced to its finest patch (the cost
of the same network without pyramidal patchification).

  python -m ppflow_jax.experiments.compare --workdir=/tmp/compare            # full run (docs/variants.md)
  python -m ppflow_jax.experiments.compare --workdir=/tmp/compare_quick --quick  # smoke test, < 60 s

Each variant trains in `<workdir>/<name>/` through loop.train_and_evaluate, so an interrupted run
resumes from its checkpoints. Results go to `<workdir>/compare.json` and `compare.md`.
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

from ppflow_jax import config_lib
from ppflow_jax import inference
from ppflow_jax import loop
from ppflow_jax import paths
from ppflow_jax import report
from ppflow_jax import sampling
from ppflow_jax import summary



@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  config: str                    # the config file (and argument), as --config= names it
  train_as: str = ''             # '' = own weights; else the variant whose weights it samples
  note: str = ''                 #   (with this variant's config.sample)


VARIANTS = (
    Variant('PPF-2', 'configs/default.py', note='each patch on its own time range'),
    Variant('FlexiDiT-style', 'configs/default_flexidit.py', note='every patch on U(0, 1)'),
    Variant('FlexiDiT-style + weak guidance', 'configs/default_flexidit.py:weak_guidance',
            train_as='FlexiDiT-style', note='2x2 steps guided by the 4x4 conditional pass (packed)'),
    Variant('Lumina-style', 'configs/default_lumina.py', note='every patch on all t, shifted'),
    Variant('MPDiT', 'configs/default_mpdit.py', note='4x4 blocks -> upsample -> 2x2 blocks'),
    Variant('PPF-2 weights, finest patch only', 'configs/default.py:finest', train_as='PPF-2',
            note='speed reference (SiT cost)'),
)


def variant_config(v: Variant, steps: int, quick: bool) -> ml_collections.ConfigDict:
  """The variant's config with the comparison's shared overrides (steps, quick sampler)."""
  c = config_lib.load_config(v.config)
  if steps:
    c.train.steps = steps
  if quick:
    c.train.update(steps=steps or 3, log_every=1, warmup_steps=0)
    c.checkpoint.update(every_steps=1000, async_save=False)
    c.sample.update(num_steps=4, batch_size=10)
  # A few resumable checkpoints, none on the last step (loop saves that one itself).
  every = c.train.steps // 3 + 1
  c.checkpoint.every_steps = every if c.train.steps % every else c.train.steps + 1
  return config_lib.resolve(c)


def last_loss(workdir: str) -> float | None:
  path = paths.join(workdir, summary.METRICS)
  if not paths.exists(path):
    return None
  records = summary.read_records(path)
  return records[-1]['loss'] if records else None


def make_evaluator(cache_dir: str, quick: bool):
  """The Fashion-MNIST FID evaluator (a tiny classifier in --quick mode), or None if absent."""
  try:
    from ppflow_jax.evaluation import fmnist_features  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    logging.warning('No Fashion-MNIST evaluator (%s): FID columns stay empty.', e)
    return None
  kw = dict(train_steps=20) if quick else {}
  return fmnist_features.FMNISTEvaluator(cache_dir, **kw)


def run(workdir: str, steps: int = 0, num_samples: int = 1000, timing_repeats: int = 3,
        fid_cache: str = '', quick: bool = False) -> list[dict]:
  """Trains, samples, scores and times every variant; writes compare.json / compare.md."""
  paths.makedirs(workdir)
  if quick:
    num_samples = min(num_samples, 20)
    timing_repeats = 1
  evaluator = make_evaluator(fid_cache or paths.join(workdir, 'fmnist_classifier'), quick)
  trained, rows, first_spec = {}, [], None
  for v in VARIANTS:
    config = variant_config(v, steps, quick)
    vdir = paths.join(workdir, v.train_as or v.name.replace(' ', '_'))
    if v.train_as:  # the trained weights, sampled with this variant's config.sample
      model, train_s = trained[v.train_as]
      model = dataclasses.replace(model, config=config)
    else:
      t0 = time.time()
      trainer, state = loop.train_and_evaluate(config, vdir)
      train_s = time.time() - t0
      model = inference.Inference.from_trainer(trainer, state.ema, step=state.step)
      trained[v.name] = (model, train_s)
    sampler = model.sampler()
    first_spec = first_spec or sampler.spec
    row = dict(variant=v.name, note=v.note, train_steps=config.train.steps,
               train_seconds=round(train_s, 1), final_loss=last_loss(vdir),
               evaluations=sum(sampling.num_evaluations(model.schedule, sampler.spec)))
    labels = np.arange(num_samples, dtype=np.int32) % config.model.num_classes
    bs, timings = config.sample.batch_size, ()
    if not sampler.spec.force_finest:  # a speed reference only (2x2 untrained at t <= 0.5)
      images, timings = sampling.sample_in_chunks(sampler, model.params, model.latent_shape,
                                                  labels, config.seed, bs)
      if evaluator is not None:
        row.update(evaluator.score(np.clip(images, -1.0, 1.0), labels))
    steady = sampling.steady_timings(sampler, model.params, model.latent_shape, labels, bs,
                                     timings, timing_repeats)
    row['sample_batch_seconds'] = float(np.median([t.seconds for t in steady]))
    row['ms_per_evaluation'] = report.ms_per_evaluation(sampler, steady)
    row['images_per_second'] = config.sample.batch_size / row['sample_batch_seconds']
    logging.info('compare: %s', row)
    rows.append(row)
  base = rows[0]['sample_batch_seconds']
  for r in rows:
    r['speed_vs_ppf2'] = base / r['sample_batch_seconds']
  meta = dict(num_samples=num_samples, quick=quick, device=str(jax.devices()[0]),
              cpu_count=os.cpu_count(), sampler=dataclasses.asdict(first_spec))
  write_results(rows, meta, workdir)
  return rows


def write_results(rows: list[dict], meta: dict, workdir: str) -> None:
  """compare.json and compare.md in `workdir` (a local path or a URL)."""
  paths.write_text(paths.join(workdir, 'compare.json'),
                   json.dumps(dict(meta=meta, rows=rows), indent=2, default=float))
  paths.write_text(paths.join(workdir, 'compare.md'), markdown(rows, meta))


def _fmt(value, spec: str) -> str:
  return '-' if value is None else format(value, spec)


def markdown(rows: list[dict], meta: dict) -> str:
  """The comparison table (one row per variant)."""
  lines = [f"Fashion-MNIST FID over {meta['num_samples']} samples (classifier features, lower is "
           f"better); sampling time of one batch on {meta['device']} ({meta['cpu_count']} CPUs).",
           '',
           '| variant | train steps | final loss | FID | precision | recall | label acc. | '
           'model evals | s / batch | speed vs PPF-2 | note |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f"| {r['variant']} | {r['train_steps']} | {_fmt(r['final_loss'], '.4f')} | "
        f"{_fmt(r.get('fid'), '.2f')} | {_fmt(r.get('precision'), '.3f')} | "
        f"{_fmt(r.get('recall'), '.3f')} | {_fmt(r.get('accuracy_of_labels'), '.3f')} | "
        f"{r['evaluations']} | {r['sample_batch_seconds']:.2f} | {r['speed_vs_ppf2']:.2f}x | "
        f"{r['note']} |")
  return '\n'.join(lines) + '\n'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  run(f.workdir, f.steps, f.num_samples, f.timing_repeats, f.fid_cache, f.quick)


def define_flags() -> None:
  """The command line's flags (defined under `__main__` only: this module is also a library)."""
  flags.DEFINE_string('workdir', None, 'Output directory (one subdirectory per trained variant).')
  flags.DEFINE_integer('steps', 0, 'Training steps per variant; 0 = the default config\'s.')
  flags.DEFINE_integer('num_samples', 1000, 'Samples per variant for the FID.')
  flags.DEFINE_integer('timing_repeats', 3, 'Timed sampling runs of one batch (after compiling).')
  flags.DEFINE_string('fid_cache', '',
                      "Fashion-MNIST classifier cache; '' = <workdir>/fmnist_classifier.")
  flags.DEFINE_bool('quick', False,
                    'Smoke test: 3 steps, 20 samples, 4 grid points, tiny classifier.')
  flags.mark_flag_as_required('workdir')


if __name__ == '__main__':
  define_flags()
  app.run(main)
