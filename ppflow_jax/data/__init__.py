"""Input pipeline: the one entry point the trainer uses, dispatching on config.data.source.

Sources: 'fashion_mnist' (32x32x1 images, the embedded default), 'imagenet' (tfds array_record),
'image_folder' (class subfolders), 'latents' (shards of `python -m ppflow_jax.data.extract`).
Image sources yield images in [-1, 1] (the trainer encodes them when config.vae.path is set);
'latents' yields VAE latents already multiplied by config.vae.scaling_factor.
"""

from __future__ import annotations

import grain
import ml_collections

from ppflow_jax import errors
from ppflow_jax import vae
from ppflow_jax.data import fashion_mnist
from ppflow_jax.data import image_folder
from ppflow_jax.data import imagenet
from ppflow_jax.data import latents
from ppflow_jax.data import pipeline
from ppflow_jax.data import transforms

SOURCES = ('fashion_mnist', 'imagenet', 'image_folder', 'latents')
# What config.data.path must name for the sources that cannot do without one.
_PATH_NEEDED = {
    'image_folder': 'an image folder (root/<class>/<images>)',
    'latents': 'a latent directory written by `python -m ppflow_jax.data.extract`',
}


def check_path(config: ml_collections.ConfigDict) -> None:
  """Raises UserFileError when config.data.source needs config.data.path and it is empty."""
  d = config.data
  if d.source in _PATH_NEEDED and not d.path:
    raise errors.UserFileError(
        f'config.data.path is empty but config.data.source={d.source!r} reads from it; set '
        f'--config.data.path to {_PATH_NEEDED[d.source]}')


def make_train_iterator(config: ml_collections.ConfigDict, *, global_batch_size: int,
                        process_index: int = 0, process_count: int = 1,
                        seed: int = 0) -> grain.DatasetIterator:
  """The training stream of config.data: an infinite, checkpointable grain iterator.

  Args:
    config: full config (config.data, config.vae.scaling_factor).
    global_batch_size: examples per step over all processes.
    process_index, process_count: this process's share, positions process_index::process_count of
      one global stream shuffled with config.data.shuffle_seed (reshuffled every epoch).
    seed: seed of the per-example randomness (flips, posterior samples).

  Returns:
    Iterator of {'x': float32 (B_local, H, W, C), 'y': int32 (B_local,)} with
    B_local = global_batch_size // process_count; `get_state()` / `set_state()` resume it.
  """
  check_path(config)
  d = config.data
  transform = transforms.random_flip if d.flip else None
  if d.source == 'fashion_mnist':
    source = fashion_mnist.FashionMNISTSource(d.path)
    get_batch = source.get_batch
  elif d.source in ('imagenet', 'image_folder'):
    source = (imagenet.ImageNetSource(d.path, d.image_size) if d.source == 'imagenet'
              else image_folder.ImageFolderSource(d.path, d.image_size))
    get_batch = transforms.ImageBatches(source)
  elif d.source == 'latents':
    source = latents.LatentSource(d.path)
    get_batch = source.get_batch
    # Flips were extracted as a second view; this picks one and samples the posterior.
    transform = latents.SampleLatent(config.vae.scaling_factor, d.flip)
  else:
    raise ValueError(f'config.data.source={d.source!r} must be one of {SOURCES}')
  return pipeline.make_iterator(
      len(source), get_batch, transform=transform, global_batch_size=global_batch_size,
      process_index=process_index, process_count=process_count, shuffle_seed=d.shuffle_seed,
      seed=seed, num_workers=d.num_workers, prefetch=d.prefetch)


def latent_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the model input produced from config.data (and config.vae for images)."""
  check_path(config)
  d = config.data
  if d.source == 'fashion_mnist':
    return fashion_mnist.SHAPE
  if d.source == 'latents':
    return latents.latent_shape(d.path)
  if d.source in ('imagenet', 'image_folder'):
    if config.vae.path:
      cfg = vae.read_vae_config(config.vae.path)
      f = cfg.downsample_factor
      return (d.image_size // f, d.image_size // f, cfg.latent_channels)
    return (d.image_size, d.image_size, 3)
  raise ValueError(f'config.data.source={d.source!r} must be one of {SOURCES}')
