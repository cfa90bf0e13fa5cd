r"""Latent extraction: encodes a whole image source with the VAE into ArrayRecord latent shards.

  python -m ppflow_jax.data.extract --config=configs/ppf_xl_2.py \
      --config.data.source=imagenet --config.data.path=TFDS_DIR \
      --config.vae.path=VAE_DIR --out=LATENT_DIR

Runs the encoder data-parallel over all local devices; with several processes (jax.distributed),
process p encodes shards p, p + P, ... . Stores the posterior moments (unscaled) of each image and, if
config.data.flip, of its horizontal flip (format: latents.py). A shard is written to a `.tmp` file and
renamed when complete, so rerunning the same command skips finished shards and rewrites partial ones.
The run ends with a check that every image index appears exactly once, then marks meta.json complete.
`--out` may be a URL (gs://...; paths.py): a shard is then written to a local temporary file and
uploaded as one object when complete.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
import tqdm
from array_record.python import array_record_module
from flax import nnx
from ml_collections import config_flags

from ppflow_jax import paths
from ppflow_jax.convert import vae as vae_weights
from ppflow_jax.models import vae as vae_lib
from ppflow_jax.data import image_folder
from ppflow_jax.data import imagenet
from ppflow_jax.data import latents


def define_flags() -> None:
  """The command line's flags (defined under `__main__` only: this module is also a library)."""
  config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  flags.DEFINE_string('out', None, 'Output directory of the latent shards.')
  flags.DEFINE_integer('shard_size', 1024, 'Images per shard (resume granularity).')
  flags.DEFINE_integer('per_device_batch', 32, 'Images per device per encoder call (each also '
                       'encoded flipped); lower it at 512 px if memory runs out.')
  flags.DEFINE_string('split', 'train', 'Split of the source (imagenet: tfds split).')
  flags.DEFINE_integer('num_threads', 16, 'Threads decoding and cropping images.')
  flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() first '
                    '(multi-process runs: TPU pods, SLURM, or JAX_COORDINATOR_ADDRESS).')


def image_source(config, split: str = 'train'):
  """The random-access uint8 image source named by config.data ({'image': (S, S, 3), 'label'})."""
  if config.data.source == 'imagenet':
    return imagenet.ImageNetSource(config.data.path, config.data.image_size, split)
  if config.data.source == 'image_folder':
    return image_folder.ImageFolderSource(config.data.path, config.data.image_size)
  raise ValueError(f'extraction needs config.data.source imagenet or image_folder, got '
                   f'{config.data.source!r}')


def _check_meta(out: str, meta: dict) -> None:
  """Writes meta.json, or checks that an existing one describes the same extraction."""
  file = paths.join(out, latents.META)
  if paths.exists(file):
    old = json.loads(paths.read_text(file))
    diff = {k: (old.get(k), v) for k, v in meta.items() if k != 'complete' and old.get(k) != v}
    if diff:
      raise ValueError(f'{out} holds a different extraction (field: (existing, requested)): '
                       f'{diff}; use another --out or the original settings')
    return
  _write_json(file, meta)


def _write_json(file: str, obj: dict) -> None:
  with paths.open_atomic(file) as f:
    f.write(json.dumps(obj, indent=1).encode())


@contextlib.contextmanager
def _staged(final: str) -> Iterator[str]:
  """A local file name to write `final` through, committed when the block ends: renamed over it
  on a local disk (a partial `.tmp` of an interrupted run is dropped first), uploaded as one
  object to a URL."""
  if not paths.is_url(final):
    tmp = final + '.tmp'
    if os.path.exists(tmp):
      os.remove(tmp)
    yield tmp
    os.replace(tmp, final)
    return
  with tempfile.TemporaryDirectory() as d:
    tmp = os.path.join(d, final.rsplit('/', 1)[-1])
    yield tmp
    with open(tmp, 'rb') as src, paths.open_atomic(final) as dst:
      shutil.copyfileobj(src, dst)


def _prefetched_shards(source, shards, shard_size: int, num_images: int,
                       pool: concurrent.futures.Executor) -> Iterator[tuple[int, Iterator[dict]]]:
  """Yields (shard, iterator of its source examples), decoding the next shard ahead in `pool`."""
  def submit(k):
    return pool.map(source.__getitem__, range(k * shard_size, min((k + 1) * shard_size, num_images)))
  pending = submit(shards[0]) if shards else None
  for i, k in enumerate(shards):
    current = pending
    pending = submit(shards[i + 1]) if i + 1 < len(shards) else None
    yield k, current


def verify(out: str, meta: dict) -> None:
  """Checks that the shards hold every image index in [0, num_images) exactly once."""
  n, counts, problems = meta['num_shards'], np.zeros(meta['num_images'], np.int64), []
  for k in range(n):
    rec, idx = paths.join(out, latents.shard_name(k, n)), paths.join(out, latents.index_name(k, n))
    if not (paths.exists(rec) and paths.exists(idx)):
      problems.append(f'shard {k} missing')
      continue
    indices = np.load(io.BytesIO(paths.read_bytes(idx)))
    if latents.array_record_can_read(rec):  # else only the index files are checked
      reader = array_record_module.ArrayRecordReader(rec)
      if reader.num_records() != len(indices):
        problems.append(f'shard {k}: {reader.num_records()} records, {len(indices)} indices')
      reader.close()
    if len(indices) and (indices.min() < 0 or indices.max() >= len(counts)):
      problems.append(f'shard {k}: index out of range')
      continue
    np.add.at(counts, indices, 1)
  absent, repeated = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
  if len(absent):
    problems.append(f'{len(absent)} images absent, e.g. {absent[:5].tolist()}')
  if len(repeated):
    problems.append(f'{len(repeated)} images repeated, e.g. {repeated[:5].tolist()}')
  if problems:
    raise RuntimeError(f'latent extraction in {out} is inconsistent: {"; ".join(problems[:10])}. '
                       'Delete the named shards and rerun the same command.')


def run(config, out: str, *, shard_size: int = 1024, per_device_batch: int = 32,
        split: str = 'train', num_threads: int = 16, model: vae_lib.AutoencoderKL | None = None,
        on_shard_done: Callable[[int], None] | None = None) -> dict:
  """Extracts (or resumes extracting) the latents of config.data's images into `out`.

  Args:
    config: full config; uses config.data (source, path, image_size, flip) and config.vae.
    out: output directory (created).
    shard_size: images per shard.
    per_device_batch: encoder batch per local device (per view).
    split: source split.
    num_threads: image decoding threads.
    model: the VAE; default: `load_diffusers_vae(config.vae.path)`.
    on_shard_done: called with each shard id after it is committed (progress hooks, tests).

  Returns:
    The meta.json dict of the complete extraction.
  """
  if model is None:
    if not config.vae.path:
      raise ValueError('set --config.vae.path to the diffusers AutoencoderKL directory '
                       '(e.g. stabilityai/sd-vae-ft-ema) used to encode the images')
    model = vae_weights.load_diffusers_vae(config.vae.path)
  source = image_source(config, split)
  num_images, views, size = len(source), 2 if config.data.flip else 1, config.data.image_size
  f = model.cfg.downsample_factor
  if size % f:
    raise ValueError(f'config.data.image_size={size} is not a multiple of the VAE factor {f}')
  num_shards = -(-num_images // shard_size)
  meta = dict(format=latents.FORMAT, source=config.data.source, data_path=config.data.path,
              split=split, image_size=size, num_images=num_images, shard_size=shard_size,
              num_shards=num_shards, views=views,
              latent_shape=[size // f, size // f, model.cfg.latent_channels],
              stored='moments (mean, logvar), unscaled, float32', vae_path=config.vae.path,
              vae_scaling_factor=model.cfg.scaling_factor,
              class_names=getattr(source, 'classes', None), complete=False)
  if abs(model.cfg.scaling_factor - config.vae.scaling_factor) > 1e-9:
    logging.warning('config.vae.scaling_factor=%s differs from the VAE config.json value %s',
                    config.vae.scaling_factor, model.cfg.scaling_factor)
  pi, pc = jax.process_index(), jax.process_count()
  paths.makedirs(out)
  if pi == 0:
    _check_meta(out, meta)
  if pc > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('ppflow_extract_meta')

  # Data-parallel over this process's devices only: no cross-process communication is needed.
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ('data',))
  batch_sharding = jax.NamedSharding(mesh, jax.P('data'))
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, jax.NamedSharding(mesh, jax.P()))
  batch = per_device_batch * len(jax.local_devices())

  @jax.jit
  def encode(state, images):
    """images: uint8 (B, S, S, 3) -> moments float32 (B, views, 2, h, w, c)."""
    x = images.astype(np.float32) / 127.5 - 1.0
    if views == 2:
      x = jax.numpy.concatenate([x, x[:, :, ::-1]])
    mean, logvar = nnx.merge(graphdef, state).encode(x)
    m = jax.numpy.stack([mean, logvar], axis=1)               # (views * B, 2, h, w, c)
    return m.reshape(views, len(images), *m.shape[1:]).swapaxes(0, 1)

  mine = list(range(pi, num_shards, pc))
  todo = [k for k in mine if not paths.exists(paths.join(out, latents.shard_name(k, num_shards)))]
  sizes = {k: min(shard_size, num_images - k * shard_size) for k in mine}
  done = sum(sizes[k] for k in mine if k not in todo)
  bar = tqdm.tqdm(total=sum(sizes.values()), initial=done, unit='img', disable=pi != 0,
                  desc=f'extract {config.data.source}')
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    for k, examples in _prefetched_shards(source, todo, shard_size, num_images, pool):
      with _staged(paths.join(out, latents.shard_name(k, num_shards))) as tmp:
        writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1,uncompressed')
        start, written = k * shard_size, []
        for b0 in range(0, sizes[k], batch):
          chunk = [next(examples) for _ in range(min(batch, sizes[k] - b0))]
          images = np.zeros((batch, size, size, 3), np.uint8)  # a fixed shape: one program
          images[:len(chunk)] = np.stack([e['image'] for e in chunk])
          moments = np.asarray(encode(state, jax.device_put(images, batch_sharding)))
          for j, e in enumerate(chunk):
            writer.write(latents.encode_record(start + b0 + j, e['label'], moments[j]))
            written.append(start + b0 + j)
          bar.update(len(chunk))
        writer.close()
        with paths.open_atomic(paths.join(out, latents.index_name(k, num_shards))) as f:
          np.save(f, np.asarray(written, np.int64))
      # leaving the block committed the shard (its rename or upload).
      if on_shard_done is not None:
        on_shard_done(k)
  bar.close()

  if pc > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('ppflow_extract_done')
  if pi == 0:
    verify(out, meta)
    meta['complete'] = True
    _write_json(paths.join(out, latents.META), meta)
    logging.info('extracted %d images into %d shards in %s', num_images, num_shards, out)
  if pc > 1:
    multihost_utils.sync_global_devices('ppflow_extract_verified')
  return meta


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.distributed:
    jax.distributed.initialize()
  run(f.config, f.out, shard_size=f.shard_size, per_device_batch=f.per_device_batch,
      split=f.split, num_threads=f.num_threads)


if __name__ == '__main__':
  from ppflow_jax import cli  # pylint: disable=g-import-not-at-top
  define_flags()
  flags.mark_flags_as_required(['config', 'out'])
  cli.run(main)
