"""The training loop: data -> sharded steps -> logs -> checkpoints -> sample grids -> report.

`train_and_evaluate(config, workdir)` is what `main --mode=train` runs. It first takes the
workdir's run lease (lease.py; a second writer is refused before it touches anything), resumes
from the latest complete checkpoint in `workdir` (checkpoint.py) and stops with a clear error,
without saving, if a step produced a non-finite loss or gradient (the state of such a step is
never kept) or a checkpoint save failed (checked before every step). On SIGTERM or a JAX
preemption sync point it saves the current step and exits with status 0. Metrics go to
`workdir/metrics.jsonl` (one JSON object per logged step); `workdir/config.json`, the run record,
is written once when the run starts and never rewritten.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging

from ppflow_jax import checkpoint
from ppflow_jax import data as data_lib
from ppflow_jax import lease as lease_lib
from ppflow_jax import report
from ppflow_jax import sharding
from ppflow_jax.train import Trainer, TrainState


class NonFiniteLossError(FloatingPointError):
  """A step produced a NaN/inf loss or gradient; the last good checkpoint is left intact."""


def global_batch(local: dict, trainer: Trainer) -> dict:
  """This process's rows -> global arrays sharded over (data, fsdp)."""
  num_classes = trainer.config.model.num_classes
  if local['y'].size and not 0 <= local['y'].min() <= local['y'].max() < num_classes:
    raise ValueError(f'labels in [{local["y"].min()}, {local["y"].max()}] do not fit '
                     f'config.model.num_classes={num_classes} (id {num_classes} is the null class)')
  return {k: jax.make_array_from_process_local_data(trainer.batch_sharding[k], np.asarray(v))
          for k, v in local.items()}


class OnlineEncoder:
  """Image batches -> model latents on device: a VAE posterior sample times the scaling factor.

  Used when config.data is an image source and config.vae.path is set; pre-extracted latents
  (data/extract.py) avoid this cost and are the recommended path for ImageNet.
  """

  def __init__(self, config: ml_collections.ConfigDict, trainer: Trainer):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from ppflow_jax import vae  # pylint: disable=g-import-not-at-top
    graphdef, self.state = nnx.split(vae.load_diffusers_vae(config.vae.path))
    scale, self.seed = config.vae.scaling_factor, config.seed

    def encode(state, images, key):
      return vae.sample_posterior(*nnx.merge(graphdef, state).encode(images), key) * scale
    self._encode = jax.jit(encode, out_shardings=trainer.batch_sharding['x'])

  def __call__(self, batch: dict, step: int) -> dict:
    """batch['x']: (B, H, W, 3) images in [-1, 1] -> (B, H/8, W/8, C) latents."""
    key = jax.random.fold_in(jax.random.key(self.seed + 1), step)
    return dict(batch, x=self._encode(self.state, batch['x'], key))


def needs_online_encoding(config: ml_collections.ConfigDict) -> bool:
  return config.data.source in ('imagenet', 'image_folder') and bool(config.vae.path)


def check_finite(pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
  """Fetches buffered step metrics; raises NonFiniteLossError at the first bad step."""
  fetched = [(step, jax.device_get(m)) for step, m in pending]
  for step, m in fetched:
    if m['nonfinite']:
      raise NonFiniteLossError(
          f'step {step}: loss={float(m["loss"])} grad_norm={float(m["grad_norm"])} is not finite. '
          'Training stopped; this step was not applied and nothing after the last checkpoint '
          'was saved. Lower config.train.lr, enable config.train.grad_clip_norm, or check the '
          'data for NaNs, then rerun the same command to resume from the last checkpoint.')
  return fetched


def drop_records_after(path: str, step: int) -> None:
  """Removes metrics of steps after `step` (work lost since the checkpoint a run resumes from)."""
  if not os.path.exists(path):
    return
  def kept(line: str) -> bool:
    try:
      return json.loads(line)['step'] <= step
    except (ValueError, KeyError):  # A line cut short by a kill.
      return False
  with open(path) as f:
    lines = [l for l in f if kept(l)]
  with open(path, 'w') as f:
    f.writelines(lines)


RUN_RECORD = 'config.json'


def write_run_record(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes `workdir/config.json` unless it exists: it describes the run that wrote the
  checkpoints beside it (each checkpoint step also keeps the config it was trained with)."""
  path = os.path.join(workdir, RUN_RECORD)
  if jax.process_index() == 0 and not os.path.exists(path):
    with open(path, 'w') as f:
      f.write(config.to_json_best_effort(indent=2))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       force: bool = False) -> tuple[Trainer, TrainState]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints) -> (trainer, final state).

  Args:
    force: take the workdir's run lease over from a holder that still looks alive.
  Raises:
    lease.LeaseHeldError: another process is training in `workdir` (nothing was written).
    checkpoint.CheckpointWriteError: a save failed; the last complete step is kept.
  """
  os.makedirs(workdir, exist_ok=True)
  with lease_lib.RunLease(workdir, expiry_s=config.checkpoint.lease_expiry_s,
                          force=force) as lease:
    return _train(config, workdir, lease)


def _train(config: ml_collections.ConfigDict, workdir: str,
           lease: lease_lib.RunLease) -> tuple[Trainer, TrainState]:
  mesh = sharding.make_mesh(config)
  trainer = Trainer(config, mesh)
  lead = jax.process_index() == 0
  data_iter = data_lib.make_train_iterator(
      config, global_batch_size=config.train.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), seed=config.seed)
  encoder = OnlineEncoder(config, trainer) if needs_online_encoding(config) else None
  ckpt = checkpoint.Checkpointer(workdir, config, trainer, lease=lease)
  try:
    state = ckpt.restore_or_init(data_iter)
  except BaseException:
    ckpt.close()
    raise
  write_run_record(config, workdir)
  start = int(jax.device_get(state.step))
  total = config.train.steps
  logging.info('training %s from step %d to %d in %s', config.model.size, start, total, workdir)

  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  if lead:
    drop_records_after(metrics_path, start)
  metrics_file = open(metrics_path, 'a') if lead else None
  pending: list[tuple[int, dict]] = []
  bar = tqdm.tqdm(total=total, initial=start, disable=not lead, dynamic_ncols=True,
                  desc='train')
  last_time, last_step = time.time(), start
  try:
    with jax.set_mesh(mesh):
      for step in range(start + 1, total + 1):
        ckpt.check_saves()
        if jax.process_count() == 1:  # A flag read; multi-process jobs check at saves (collective).
          lease.check()
        batch = global_batch(next(data_iter), trainer)
        if encoder is not None:
          batch = encoder(batch, step)
        state, metrics = trainer.step(state, batch)
        pending.append((step, metrics))
        bar.update(1)
        if step % config.train.log_every == 0 or step == total or ckpt.should_save(step):
          fetched = check_finite(pending)
          pending = []
          now = time.time()
          rate = (step - last_step) / max(now - last_time, 1e-9)
          last_time, last_step = now, step
          record = {k: float(v) for k, v in fetched[-1][1].items()}
          record.update(step=step, steps_per_sec=rate)
          bar.set_postfix(loss=f'{record["loss"]:.4f}', steps_s=f'{rate:.2f}')
          if metrics_file:
            metrics_file.write(json.dumps(record) + '\n')
            metrics_file.flush()
        if ckpt.reached_preemption(step):
          check_finite(pending)
          ckpt.save(step, state, data_iter, force=True)
          logging.warning('preempted: saved step %d; rerun the same command to resume', step)
          raise SystemExit(0)  # A clean exit that skips the report; `finally` awaits the save.
        ckpt.maybe_save(step, state, data_iter)
        if config.train.sample_every and step % config.train.sample_every == 0 and lead:
          report.save_sample_grid(trainer, state, config,
                                  os.path.join(workdir, f'samples_{step:07d}.png'))
    ckpt.save(total, state, data_iter, force=True)
  finally:
    bar.close()
    ckpt.close()
    if metrics_file:
      metrics_file.close()
  return trainer, state

