"""The training loop: data -> sharded steps -> logs -> checkpoints -> sample grids -> report.

`train_and_evaluate(config, workdir)` is what `main --mode=train` runs. It resumes from the
latest complete checkpoint in `workdir` (checkpoint.py) and stops with a clear error, without
saving, if a step produced a non-finite loss or gradient (the state of such a step is never kept).
On SIGTERM or a JAX preemption sync point it saves the current step and exits with status 0.
Metrics (loss, per-stage loss, grad norm, lr, images/s, estimated MFU) go to
`workdir/metrics.jsonl` and TensorBoard events in `workdir/tensorboard/` (summary.py); with
config.train.sample_every every process samples an EMA grid, decoded by the VAE for latent
configs, and process 0 writes it as a PNG and a TensorBoard image. A run first takes the
workdir's run lease (lease.py; a second writer is refused before it touches anything), stops
with one line when a checkpoint save failed (checked before every step), and writes
`workdir/config.json`, the run record, once when the run starts, never rewriting it.
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging

from ppflow_jax import checkpoint
from ppflow_jax import data as data_lib
from ppflow_jax import inference
from ppflow_jax import lease as lease_lib
from ppflow_jax import paths
from ppflow_jax import report
from ppflow_jax import sharding
from ppflow_jax import summary
from ppflow_jax import train as train_lib
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
    from ppflow_jax.convert import vae as vae_weights  # pylint: disable=g-import-not-at-top
    from ppflow_jax.models import vae  # pylint: disable=g-import-not-at-top
    graphdef, self.state = nnx.split(vae_weights.load_diffusers_vae(config.vae.path))
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


RUN_RECORD = 'config.json'


def write_run_record(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes `workdir/config.json` unless it exists: it describes the run that wrote the
  checkpoints beside it (each checkpoint step also keeps the config it was trained with)."""
  path = paths.join(workdir, RUN_RECORD)
  if jax.process_index() == 0 and not paths.exists(path):
    paths.write_text(path, config.to_json_best_effort(indent=2))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       force: bool = False) -> tuple[Trainer, TrainState]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints) -> (trainer, final state).

  Args:
    force: take the workdir's run lease over from a holder that still looks alive.
  Raises:
    lease.LeaseHeldError: another process is training in `workdir` (nothing was written).
    checkpoint.CheckpointWriteError: a save failed; the last complete step is kept.
  """
  paths.makedirs(workdir)
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

  writer = summary.RunWriter(workdir, enabled=lead, resume_step=start)
  lr_at = train_lib.learning_rate(config)
  flops_per_image = summary.training_flops_per_image(config)
  vae = None
  if config.train.sample_every:
    from ppflow_jax.convert import vae as vae_weights  # pylint: disable=g-import-not-at-top
    vae = vae_weights.for_config(config)
  pending: list[tuple[int, dict]] = []
  bar = tqdm.tqdm(total=total, initial=start, disable=not lead, dynamic_ncols=True,
                  desc='train')
  last_time, last_step = time.time(), start
  try:
    with jax.set_mesh(mesh):
      for step in range(start + 1, total + 1):
        ckpt.check_saves(step)
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
          rates = summary.step_rates(config, step - last_step, now - last_time, flops_per_image)
          last_time, last_step = now, step
          record = {k: float(v) for k, v in fetched[-1][1].items()}
          record.update(lr=float(lr_at(step - 1)), **rates)
          bar.set_postfix(loss=f'{record["loss"]:.4f}', steps_s=f'{rates["steps_per_sec"]:.2f}')
          writer.scalars(step, record)
        if ckpt.reached_preemption(step):
          check_finite(pending)
          ckpt.save(step, state, data_iter, force=True)
          logging.warning('preempted: saved step %d; rerun the same command to resume', step)
          raise SystemExit(0)  # A clean exit that skips the report; `finally` awaits the save.
        ckpt.maybe_save(step, state, data_iter)
        if config.train.sample_every and step % config.train.sample_every == 0:
          grid = report.sample_grid(  # every process samples
              inference.Inference.from_trainer(trainer, state.ema, step=step, vae=vae))
          if lead:
            report.save_png(grid, paths.join(workdir, f'samples_{step:07d}.png'))
            writer.image(step, 'samples/ema', grid)
    ckpt.save(total, state, data_iter, force=True)
  finally:
    bar.close()
    ckpt.close()
    writer.close()
  return trainer, state

