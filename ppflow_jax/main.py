"""Command-line entry point: `python -m ppflow_jax.main --config=configs/X.py --workdir=DIR`.

Modes: `train` (default; takes the workdir's run lease, resumes from the latest checkpoint in
workdir, then writes the run report), `sample` (a class-conditional grid from the workdir's EMA
weights, recorded in samples.json) and `sample_fid` (evaluation/sample.py: N samples as an ADM
.npz with an eval card). Sampling modes only read the workdir's checkpoints and config.json.
A second `train` on a busy workdir exits with status 2; a failed checkpoint save with status 1,
each with one line on stderr. Any config field can be overridden:
`--config.train.steps=100 --config.schedule.cfg_scales='(1.0, 4.0)'`.
Multi-process runs call `jax.distributed.initialize()` (automatic on TPU VMs; on GPU clusters
pass --coordinator_address, --num_processes and --process_id, see launch/).
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ppflow_jax import cli
from ppflow_jax import config_lib
from ppflow_jax import paths
from ppflow_jax.convert import vae as vae_weights


def define_flags() -> None:
  """Defines this entry point's flags (called under `__main__` only, so that importing this
  module beside any other never redefines a flag)."""
  config_flags.DEFINE_config_file('config', None, 'Config file (get_config()).', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Checkpoints, logs, samples and reports.')
  flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'sample_fid'], 'What to run.')
  flags.DEFINE_bool('force', False, 'Take the workdir\'s run lease over from a process that '
                    'still looks alive (confirm it is gone first).')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
  flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
  flags.DEFINE_integer('process_id', None, 'This process index.')
  flags.DEFINE_string('class_labels', '', '--mode=sample: comma-separated class ids, one image '
                      'each (default: config.sample.num_images images, one class per grid row).')
  flags.mark_flags_as_required(['config', 'workdir'])


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Joins a multi-process job when the arguments or the TPU environment say there is one."""
  if num_processes and num_processes > 1:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif tpu_multi_host():
    jax.distributed.initialize()


def tpu_multi_host(environ=os.environ, exists=os.path.exists) -> bool:
  """Whether this process is one of several TPU hosts (slices) and must join a jax.distributed job.

  Read from the TPU VM environment: several TPU_WORKER_HOSTNAMES, TPU_HOST_BOUNDS (hosts per
  dimension) or MEGASCALE_NUM_SLICES above 1. On a Cloud TPU VM (/dev/accel0 or /dev/vfio/0) where
  none of these is set, plain VMs may not set them, so it is True too: `jax.distributed.initialize()`
  then reads the slice's workers from the VM metadata itself (a one-host slice becomes a one-process
  job). Elsewhere (CPU, GPU, one TPU host that says so) False.
  """
  hosts = [h for h in environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h.strip()]
  bounds = [int(b) for b in environ.get('TPU_HOST_BOUNDS', '').split(',') if b.strip()]
  slices = int(environ.get('MEGASCALE_NUM_SLICES', '') or 1)
  if len(hosts) > 1 or math.prod(bounds) > 1 or slices > 1:
    return True
  said_one_host = len(hosts) == 1 or bool(bounds)
  return not said_one_host and any(exists(p) for p in ('/dev/accel0', '/dev/vfio/0'))


def fmnist_evaluator(config, workdir: str):
  """The Fashion-MNIST feature network for the embedded default's FID (None elsewhere)."""
  if config.data.source != 'fashion_mnist' or not config.eval.fmnist_fid:
    return None
  from ppflow_jax.evaluation import fmnist_features  # pylint: disable=g-import-not-at-top
  return fmnist_features.FMNISTEvaluator(paths.join(workdir, 'fmnist_classifier'))


def run(config, workdir: str, mode: str, class_labels: str = '', force: bool = False) -> None:
  from ppflow_jax import checkpoint, inference, loop, report  # pylint: disable=g-import-not-at-top
  config = config_lib.resolve(config)
  if mode == 'train':
    trainer, state = loop.train_and_evaluate(config, workdir, force=force)
  elif mode == 'sample':
    model = inference.Inference.from_workdir(workdir, config, vae=vae_weights.for_config(config))
    labels = None
    if class_labels:
      from ppflow_jax import sample  # pylint: disable=g-import-not-at-top
      labels = sample.parse_labels(class_labels, config.model.num_classes)
    out = paths.join(workdir, 'samples.png')
    report.save_sample_grid(model, out, labels=labels)
    if jax.process_index() == 0:  # The record of this grid; config.json stays the run's.
      paths.write_text(paths.join(workdir, 'samples.json'), json.dumps(dict(
          samples=out, step=model.step, config=checkpoint.config_json(config)), indent=2))
    print(f'wrote {out}')
    return
  else:
    from ppflow_jax.evaluation import sample as fid_sample  # pylint: disable=g-import-not-at-top
    fid_sample.run(config, workdir)
    return
  if jax.process_index() == 0 and config.train.final_report:
    model = inference.Inference.from_trainer(trainer, state.ema, step=state.step,
                                             vae=vae_weights.for_config(config))
    result = report.final_report(model, workdir, evaluator=fmnist_evaluator(config, workdir))
    logging.info('report: %s', json.dumps(result))
    print(paths.read_text(paths.join(workdir, 'report.md')))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  maybe_initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
  if f.class_labels and f.mode != 'sample':
    raise app.UsageError('--class_labels is for --mode=sample')
  from ppflow_jax import checkpoint, lease  # pylint: disable=g-import-not-at-top
  try:
    run(f.config, paths.check(f.workdir, '--workdir'), f.mode, f.class_labels, force=f.force)
  except lease.LeaseHeldError as e:
    cli.fail(str(e))
  except (checkpoint.CheckpointWriteError, lease.LeaseLostError) as e:
    cli.print_error(str(e))
    sys.exit(1)


def console() -> None:
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  console()
