"""FID sampling: N samples from a workdir's EMA weights as an ADM `.npz`, plus an eval card.

  python -m ppflow_jax.main --mode=sample_fid --config=configs/ppf_xl_2.py --workdir=DIR

Sample i depends only on i: its noise and SDE key are `fold_in(key(config.seed), i)`
(`sampling.index_noise`) and its label is entry i of a label list fixed by
(config.eval.labels, config.seed, N). So the result does not depend on the batch size, the
device count or the number of processes, up to float rounding.

The N indices are cut into chunks of one global batch (`config.sample.batch_size`). Each chunk is
sharded over the mesh's batch axes (data x fsdp) of all devices of all processes; each process
feeds the rows of its own devices (`process_rows`). Finished chunks go to
`workdir/fid_samples/chunk_XXXXX.npz` (written atomically by process 0), so a rerun skips them;
at the end they are merged in index order into `samples_NxHxWxC.npz` (`arr_0`: uint8 NHWC images,
as ADM's evaluator reads them; `arr_1`: labels) and `eval_card.json` records everything that
changes the numbers. With a reference batch and Inception weights (config.eval) the card also
gets FID / sFID / IS / precision / recall; on Fashion-MNIST, the classifier-feature FID /
precision / recall (fmnist_features.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ppflow_jax import checkpoint
from ppflow_jax import config_lib
from ppflow_jax import inference
from ppflow_jax import paths
from ppflow_jax import sampling
from ppflow_jax.convert import vae as vae_weights

SAMPLES_DIR = 'fid_samples'
CARD_FILE = 'eval_card.json'
_LABEL_STREAM = 1  # labels use fold 1 of config.seed, so they never correlate with the noise.


# -- per-index randomness ---------------------------------------------------------------------


def index_labels(mode: str, num_samples: int, num_classes: int, seed: int) -> np.ndarray:
  """Class labels (num_samples,) int32 of sample indices 0..N-1.

  'uniform': i.i.d. uniform labels from a seeded RNG (ADM / DiT sample this way);
  'balanced': N / num_classes consecutive indices per class (50 per class at N = 50,000).
  """
  if mode == 'uniform':
    rng = np.random.default_rng([seed, _LABEL_STREAM])
    return rng.integers(0, num_classes, num_samples).astype(np.int32)
  if mode == 'balanced':
    if num_samples % num_classes:
      raise ValueError(f"config.eval.labels='balanced' needs config.eval.num_samples="
                       f'{num_samples} divisible by num_classes={num_classes}')
    return (np.arange(num_samples) // (num_samples // num_classes)).astype(np.int32)
  raise ValueError(f"config.eval.labels={mode!r} must be 'uniform' or 'balanced'")


# -- index sharding ---------------------------------------------------------------------------


def num_chunks(num_samples: int, batch_size: int) -> int:
  return -(-num_samples // batch_size)


def chunk_indices(chunk: int, batch_size: int) -> np.ndarray:
  """The (batch_size,) global indices of a chunk; indices >= N are padding, dropped on save."""
  return np.arange(chunk * batch_size, (chunk + 1) * batch_size, dtype=np.int32)


def process_rows(batch_sharding: jax.sharding.NamedSharding, batch_size: int,
                 process_index: int, device_process: Callable | None = None) -> np.ndarray:
  """Rows of a (batch_size,) global batch that `process_index`'s devices hold, ascending.

  device_process: device -> process index (default `device.process_index`; tests pass a
  simulated multi-process assignment). Rows replicated over non-batch mesh axes count once.
  """
  owner = device_process or (lambda d: d.process_index)
  rows = set()
  for device, index in batch_sharding.devices_indices_map((batch_size,)).items():
    if owner(device) == process_index:
      rows.update(range(batch_size)[index[0]])
  return np.asarray(sorted(rows), np.int64)


# -- generation -------------------------------------------------------------------------------


def _global_rows(values: np.ndarray, batch_sharding, batch_size: int) -> jax.Array:
  """A global (batch_size, ...) array of `values` from this process's rows only."""
  rows = process_rows(batch_sharding, batch_size, jax.process_index())
  return jax.make_array_from_process_local_data(batch_sharding, values[rows],
                                                (batch_size, *values.shape[1:]))


def _fingerprint(config: ml_collections.ConfigDict, spec: sampling.SamplerSpec,
                 step: int, num_samples: int) -> str:
  """Hash of everything that determines the chunks' content and layout."""
  what = dict(spec=repr(spec), step=step, num_samples=num_samples, seed=config.seed,
              labels=config.eval.labels, batch_size=config.sample.batch_size,
              schedule=config.schedule.to_dict(), model=config.model.to_dict(),
              latent=config.latent.to_dict(), vae=config.vae.to_dict(),
              use_ema=config.sample.use_ema)
  return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _chunk_path(directory: str, chunk: int) -> str:
  return paths.join(directory, f'chunk_{chunk:05d}.npz')


def _chunk_done(path: str, fingerprint: str) -> bool:
  """True if `path` is a complete chunk of this run; raises if it belongs to another run."""
  if not paths.exists(path):
    return False
  try:
    with paths.load_npz(path) as f:
      got = str(f['fingerprint'])
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('%s is unreadable (%s): sampling it again.', path, e)
    return False
  if got != fingerprint:
    raise ValueError(f'{path} was written by a run with other settings (checkpoint step, sampler, '
                     'labels, seed, batch size or model differ). Delete '
                     f'{path.rsplit("/", 1)[0]} or use another --workdir / config.eval.out_dir.')
  return True


def generate(model: inference.Inference, out_dir: str, *,
             on_chunk: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Samples config.eval.num_samples images into chunk files of `out_dir` (skipping finished
  ones) and returns (images uint8 (N, H', W', C'), labels (N,)) in index order on process 0,
  (None, None) on the others.

  model: the weights to sample and their training step (recorded in each chunk, so chunks of
  another checkpoint are refused). on_chunk(c): called after chunk c is saved (tests interrupt
  runs with it).
  """
  config = model.config
  n, bs = config.eval.num_samples, config.sample.batch_size
  if n <= 0:
    raise ValueError(f'config.eval.num_samples={n} must be positive')
  if bs % model.batch_shards:
    raise ValueError(f'config.sample.batch_size={bs} is not divisible by the {model.batch_shards}'
                     ' batch shards of the mesh (data x fsdp); change it or config.mesh')
  sampler = model.sampler()
  labels = index_labels(config.eval.labels, n, config.model.num_classes, config.seed)
  padded_labels = np.concatenate([labels, np.zeros(num_chunks(n, bs) * bs - n, np.int32)])
  fingerprint = _fingerprint(config, sampler.spec, model.step, n)
  lead = jax.process_index() == 0
  if lead:
    paths.makedirs(out_dir)
  batch_sharding = model.batch_sharding['y']
  noise_fn = jax.jit(lambda idx: sampling.index_noise(model.latent_shape, idx, config.seed),
                     out_shardings=(model.batch_sharding['x'], batch_sharding))

  todo = [c for c in range(num_chunks(n, bs)) if not _chunk_done(_chunk_path(out_dir, c),
                                                                  fingerprint)]
  # Every process must run the same chunks (they are collective); process 0's view decides.
  mask = np.zeros(num_chunks(n, bs), np.int32)
  mask[todo] = 1
  mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
  todo = [int(c) for c in np.flatnonzero(mask)]
  logging.info('FID sampling: %d images, %d chunks of %d, %d to do -> %s', n, len(mask), bs,
               len(todo), out_dir)
  t0 = time.time()
  with jax.set_mesh(model.mesh):
    for k, c in enumerate(todo):
      idx = chunk_indices(c, bs)
      noise, keys = noise_fn(_global_rows(idx, batch_sharding, bs))
      y = _global_rows(padded_labels[idx], batch_sharding, bs)
      x = model.decode(sampler.sample(model.params, noise, y, keys))
      images = multihost_utils.process_allgather(jnp.clip((x + 1.0) * 127.5 + 0.5, 0, 255)
                                                 .astype(jnp.uint8), tiled=True)
      keep = idx < n
      if lead:
        paths.save_npz(_chunk_path(out_dir, c), images=np.asarray(images)[keep],
                         labels=padded_labels[idx][keep], indices=idx[keep],
                         fingerprint=np.array(fingerprint))
      logging.info('chunk %d (%d/%d) done, %.1f s/chunk', c, k + 1, len(todo),
                   (time.time() - t0) / (k + 1))
      if on_chunk is not None:
        on_chunk(c)
  multihost_utils.sync_global_devices('fid_samples_written')
  return merge_chunks(out_dir, n, fingerprint) if lead else (None, None)


def merge_chunks(out_dir: str, num_samples: int,
                 fingerprint: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """All chunks of `out_dir` -> (images (N, ...), labels (N,)) in index order; checks that every
  index 0..N-1 is present exactly once."""
  images, labels, indices = [], [], []
  for path in paths.glob(out_dir, 'chunk_*.npz'):
    with paths.load_npz(path) as f:
      if fingerprint is not None and str(f['fingerprint']) != fingerprint:
        raise ValueError(f'{path} belongs to another run; delete {out_dir} and sample again')
      images.append(f['images'])
      labels.append(f['labels'])
      indices.append(f['indices'])
  if not indices:
    raise FileNotFoundError(f'no chunk_*.npz in {out_dir}')
  indices = np.concatenate(indices)
  counts = np.bincount(indices, minlength=num_samples)
  if len(counts) != num_samples or not np.all(counts == 1):
    raise ValueError(f'{out_dir}: chunks cover {int((counts > 0).sum())} of {num_samples} indices '
                     f'with {int((counts > 1).sum())} duplicated; delete it and sample again')
  order = np.argsort(indices)
  return np.concatenate(images)[order], np.concatenate(labels)[order]


# -- the eval card ----------------------------------------------------------------------------


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with paths.as_path(path).open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def code_version() -> str | None:
  """`git rev-parse HEAD` of the checkout this package runs from (None outside git)."""
  try:
    out = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=10,
                         cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
    return out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def checkpoint_path(workdir: str, step: int) -> str:
  """Where restore_for_inference read the weights of `step` from."""
  step_dir = paths.join(paths.absolute(workdir), checkpoint.CHECKPOINTS, str(step))
  if paths.isdir(step_dir):
    return step_dir
  return paths.join(paths.absolute(workdir), checkpoint.PARAMS_DIR)


def eval_card(model: inference.Inference, *, checkpoint_dir: str, samples_file: str,
              num_samples: int) -> dict:
  """Everything that changes the published numbers of `model`'s sample batch, as a JSON-able
  dict (its sampler's spec and schedule, the config's evaluator, the code and devices)."""
  config, schedule, step = model.config, model.schedule, model.step
  spec = model.sampler().spec
  adaptive = spec.method == sampling.ADAPTIVE
  ref = config.eval.reference_batch
  devices = jax.devices()
  e = config.eval
  return dict(
      checkpoint=checkpoint_dir, checkpoint_step=step,
      weights='ema' if config.sample.use_ema else 'params',
      # Every SamplerSpec field: method, grid, CFG channels, unit-scale skip, SDE settings, ...
      sampler=dataclasses.asdict(spec),
      stage_rule='a time on a boundary belongs to the coarser stage (official sampler)',
      time_direction='t = 0 noise, t = 1 data (SiT)',
      stage_patch_sizes=[list(p) for p in config.schedule.patch_sizes],
      stage_boundaries=list(config.schedule.boundaries),
      stage_cfg_scales=list(config.schedule.cfg_scales),
      cfg_channels=spec.cfg_channels, skip_unit_cfg=spec.skip_unit_cfg,
      # dopri5's counts depend on the data: the sampler measures them (adaptive.py).
      model_evaluations=None if adaptive else sum(sampling.num_evaluations(schedule, spec)),
      forward_passes=None if adaptive else sum(sampling.forward_passes(schedule, spec)),
      precision=dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                     attention=config.model.attention),
      null_class=config.model.num_classes,
      labels=e.labels, num_samples=num_samples, seed=config.seed,
      samples_file=paths.absolute(samples_file),
      vae=config.vae.path or None, vae_scaling_factor=config.vae.scaling_factor,
      evaluator=dict(inception_preprocess=e.inception_preprocess, pr_distances=e.pr_distances,
                     is_split_size=e.is_split_size, inception_weights=e.inception_weights or None),
      reference_batch=ref or None,
      reference_batch_sha256=file_sha256(ref) if ref else None,
      code_version=code_version(), jax_version=jax.__version__,
      device_kind=devices[0].device_kind, device_count=len(devices),
      process_count=jax.process_count())


def _metrics(config: ml_collections.ConfigDict, workdir: str, samples_file: str,
             images: np.ndarray, labels: np.ndarray) -> dict:
  """ADM metrics with a reference batch + Inception weights; Fashion-MNIST metrics otherwise."""
  e = config.eval
  if e.reference_batch and e.inception_weights:
    from ppflow_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
    return dict(metrics=evaluate.evaluate(
        samples_file, e.reference_batch, e.inception_weights, preprocess=e.inception_preprocess,
        is_split_size=e.is_split_size, pr_distances=e.pr_distances))
  if config.data.source == 'fashion_mnist' and e.fmnist_fid:
    from ppflow_jax.evaluation import fmnist_features  # pylint: disable=g-import-not-at-top
    evaluator = fmnist_features.FMNISTEvaluator(paths.join(workdir, 'fmnist_classifier'))
    scores = evaluator.score(
        images.astype(np.float32) / 127.5 - 1.0, labels)
    return dict(fmnist_metrics={k: v for k, v in scores.items() if v is not None})
  if e.reference_batch or e.inception_weights:
    logging.warning('config.eval needs both reference_batch and inception_weights for metrics.')
  return {}


def run(config: ml_collections.ConfigDict, workdir: str, *,
        on_chunk: Callable[[int], None] | None = None) -> dict:
  """Samples config.eval.num_samples images from `workdir`'s weights -> the eval card.

  Writes (in config.eval.out_dir, default workdir/fid_samples): chunk files, the ADM batch
  `samples_NxHxWxC.npz` and `eval_card.json` (process 0; other processes return {}).
  """
  config = config_lib.resolve(config)
  model = inference.Inference.from_workdir(workdir, config, vae=vae_weights.for_config(config))
  step = model.step
  out_dir = config.eval.out_dir or paths.join(workdir, SAMPLES_DIR)
  images, labels = generate(model, out_dir, on_chunk=on_chunk)
  if images is None:
    return {}
  samples_file = paths.join(out_dir, 'samples_{}.npz'.format('x'.join(map(str, images.shape))))
  card = eval_card(model, checkpoint_dir=checkpoint_path(workdir, step),
                   samples_file=samples_file, num_samples=len(images))
  paths.save_npz(samples_file, arr_0=images, arr_1=labels)
  card.update(_metrics(config, workdir, samples_file, images, labels))
  paths.write_text(paths.join(out_dir, CARD_FILE), json.dumps(card, indent=2))
  logging.info('wrote %s and %s', samples_file, paths.join(out_dir, CARD_FILE))
  return card

