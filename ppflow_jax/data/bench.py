r"""Loader throughput: images/s of `make_train_iterator` for synthetic latent shards and Fashion-MNIST.

  python -m ppflow_jax.data.bench --batch=256 --steps=200

The latent shards are written to a temporary directory in the extract.py format (moments of the
image and its flip, 32x32x4), so no VAE or ImageNet is needed.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from array_record.python import array_record_module

from ppflow_jax import config_lib
from ppflow_jax import data
from ppflow_jax.data import latents

_SHAPE = (32, 32, 4)


def write_synthetic_latents(out: str, num_images: int, shard_size: int = 1024) -> None:
  """Writes a complete latent directory of random moments (2 views) with random labels."""
  rng = np.random.default_rng(0)
  n = -(-num_images // shard_size)
  for k in range(n):
    writer = array_record_module.ArrayRecordWriter(
        os.path.join(out, latents.shard_name(k, n)), 'group_size:1,uncompressed')
    idx = np.arange(k * shard_size, min((k + 1) * shard_size, num_images))
    for i in idx:
      m = rng.normal(size=(2, 2, *_SHAPE)).astype(np.float32)
      writer.write(latents.encode_record(i, int(i % 1000), m))
    writer.close()
    np.save(os.path.join(out, latents.index_name(k, n)), idx)
  meta = dict(format=latents.FORMAT, num_images=num_images, shard_size=shard_size, num_shards=n,
              views=2, latent_shape=list(_SHAPE), complete=True)
  with open(os.path.join(out, latents.META), 'w') as f:
    json.dump(meta, f)


def images_per_second(config, batch: int, steps: int) -> float:
  it = data.make_train_iterator(config, global_batch_size=batch)
  for _ in range(5):  # warm-up: threads, first epoch permutation
    next(it)
  t = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch / (time.perf_counter() - t)


def main(argv):
  del argv
  f = flags.FLAGS
  config = config_lib.base_config()
  config.data.num_workers = f.num_workers
  with tempfile.TemporaryDirectory() as tmp:
    write_synthetic_latents(tmp, f.num_images)
    config.data.source, config.data.path = 'latents', tmp
    print(f'latents {_SHAPE} (posterior sample + flip view): '
          f'{images_per_second(config, f.batch, f.steps):,.0f} images/s')
  config.data.source, config.data.path = 'fashion_mnist', ''
  print(f'fashion_mnist (32, 32, 1): '
        f'{images_per_second(config, f.batch, f.steps):,.0f} images/s')


if __name__ == '__main__':
  # Flags only under __main__: this module is imported by tests as a library.
  flags.DEFINE_integer('num_images', 20_000, 'Synthetic latent records.')
  flags.DEFINE_integer('batch', 256, 'Global batch size.')
  flags.DEFINE_integer('steps', 200, 'Timed batches.')
  flags.DEFINE_integer('num_workers', 0, 'config.data.num_workers.')
  app.run(main)
