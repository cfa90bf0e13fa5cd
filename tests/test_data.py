"""Input pipeline: Fashion-MNIST, ADM crop, shuffling/sharding, latent extraction + resume + loader."""

from __future__ import annotations

import gzip
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from ppflow_jax import config_lib
from ppflow_jax import data
from ppflow_jax.models import vae
from ppflow_jax.data import extract
from ppflow_jax.data import fashion_mnist
from ppflow_jax.data import latents
from ppflow_jax.data import pipeline
from ppflow_jax.data import transforms

TINY_VAE = vae.VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)


# --- Fashion-MNIST ---------------------------------------------------------------------------------

def _write_idx(file, arr: np.ndarray, magic: int):
  header = magic.to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in arr.shape)
  with gzip.open(file, 'wb') as f:
    f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_synthetic_idx(tmp_path):
  rng = np.random.default_rng(0)
  raw = rng.integers(1, 256, (5, 28, 28))
  _write_idx(tmp_path / 'train-images-idx3-ubyte.gz', raw, 2051)
  _write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', np.arange(5) + 3, 2049)
  src = fashion_mnist.FashionMNISTSource(str(tmp_path))
  b = src.get_batch(np.array([4, 0]))
  assert b['x'].shape == (2, 32, 32, 1) and b['x'].dtype == np.float32
  assert b['y'].dtype == np.int32 and b['y'].tolist() == [7, 3]
  np.testing.assert_allclose(b['x'][0, 2:30, 2:30, 0], raw[4] / 127.5 - 1, atol=1e-6)
  border = np.ones((32, 32), bool)
  border[2:30, 2:30] = False
  assert np.all(b['x'][:, border] == -1.0)  # padding is background (pixel 0)


def test_fashion_mnist_bad_magic(tmp_path):
  _write_idx(tmp_path / 'train-images-idx3-ubyte.gz', np.zeros((1, 28, 28)), 2049)
  _write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', np.zeros(1), 2049)
  with pytest.raises(ValueError, match='magic'):
    fashion_mnist.load(str(tmp_path))


def test_fashion_mnist_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
    fashion_mnist.load(str(tmp_path))


@pytest.mark.skipif(not os.path.exists(fashion_mnist.DEFAULT_PATH),
                    reason='Debian package dataset-fashion-mnist not installed')
def test_fashion_mnist_debian_files_and_iterator():
  images, labels = fashion_mnist.load()
  assert images.shape == (60000, 32, 32, 1) and labels.shape == (60000,)
  np.testing.assert_array_equal(np.bincount(labels), [6000] * 10)
  config = config_lib.base_config()
  config.data.source = 'fashion_mnist'
  it = data.make_train_iterator(config, global_batch_size=64, process_index=1, process_count=2)
  b = next(it)
  assert b['x'].shape == (32, 32, 32, 1) and b['y'].shape == (32,)
  assert b['x'].min() == -1.0 and 0.9 < b['x'].max() <= 1.0
  assert data.latent_shape(config) == (32, 32, 1)


# --- ADM center crop ----------------------------------------------------------------------------

def _reference_crop(image: Image.Image, size: int) -> np.ndarray:
  """ADM crop written out step by step: halvings counted first, the crop taken as a PIL box."""
  image = image.convert('RGB')
  w, h = image.size
  halvings = 0
  while min(w >> (halvings + 1), h >> (halvings + 1)) >= size:  # i.e. side >= 2 * size before
    halvings += 1
  for _ in range(halvings):
    w, h = w // 2, h // 2
    image = image.resize((w, h), Image.BOX)
  scale = size / min(w, h)
  image = image.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
  left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize('shape,size', [((170, 300), 64), ((48, 40), 32), ((520, 256), 64)])
def test_center_crop_matches_reference(shape, size):
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  arr = (np.stack([xx, yy, xx + yy], -1) * 3 + rng.integers(0, 40, (*shape, 3))) % 256
  image = Image.fromarray(arr.astype(np.uint8))
  got = transforms.center_crop_arr(image, size)
  assert got.shape == (size, size, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, _reference_crop(image, size))
  gray = transforms.center_crop_arr(image.convert('L'), size)
  assert gray.shape == (size, size, 3)


# --- Global shuffle and process sharding -----------------------------------------------------------

def _index_batches(n, b_global, pi, pc, steps, **kw):
  it = pipeline.make_iterator(n, lambda idx: {'i': idx}, transform=None,
                              global_batch_size=b_global, process_index=pi, process_count=pc,
                              shuffle_seed=3, seed=0, **kw)
  return [next(it)['i'] for _ in range(steps)]


def test_shuffle_epochs_and_process_sharding():
  n, b = 12, 4
  single = _index_batches(n, b, 0, 1, 6)
  epoch0, epoch1 = np.concatenate(single[:3]), np.concatenate(single[3:])
  assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
  assert not np.array_equal(epoch0, epoch1)  # reshuffled each epoch
  assert not np.array_equal(epoch0, np.arange(n))
  two = [_index_batches(n, b, p, 2, 6) for p in range(2)]
  for step in range(6):  # the processes' batches together are the single-process global batch
    assert sorted(np.concatenate([two[0][step], two[1][step]])) == sorted(single[step])
  with pytest.raises(ValueError, match='multiple of process_count'):
    _index_batches(n, 5, 0, 2, 1)


# --- Image folder, extraction, resume, latent loader -----------------------------------------------

@pytest.fixture(scope='module')
def image_folder_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  for c in ('cat', 'ant', 'bee'):
    os.makedirs(root / c)
    for i in range(7):
      shape = (32, 40) if i % 2 else (36, 32)  # non-square: the crop matters
      Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(root / c / f'{i}.png')
  (root / 'ant' / 'notes.txt').write_text('not an image')
  return str(root)


def _config(source: str, path: str) -> config_lib.ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.data.source, config.data.path, config.data.image_size = source, path, 32
  return config


def test_image_folder_iterator(image_folder_dir):
  src = extract.image_source(_config('image_folder', image_folder_dir))
  assert src.classes == ['ant', 'bee', 'cat'] and len(src) == 21
  assert src[0]['label'] == 0 and src[20]['label'] == 2
  crops = np.stack([transforms.to_unit_range(src[i]['image']) for i in range(21)])
  config = _config('image_folder', image_folder_dir)
  it = data.make_train_iterator(config, global_batch_size=7)
  flipped = 0
  for _ in range(3):  # one epoch
    b = next(it)
    assert b['x'].shape == (7, 32, 32, 3) and b['y'].dtype == np.int32
    for x, y in zip(b['x'], b['y']):
      plain = np.all(crops == x, axis=(1, 2, 3))
      mirrored = np.all(crops[:, :, ::-1] == x, axis=(1, 2, 3))
      i = np.flatnonzero(plain | mirrored)
      assert len(i) == 1 and src.labels[i[0]] == y
      flipped += int(mirrored[i[0]])
  assert 0 < flipped < 21


@pytest.fixture(scope='module')
def tiny_vae():
  # Random weights filled in numpy: eager flax init compiles one initializer per shape (slow on CPU).
  graphdef, state = nnx.split(nnx.eval_shape(lambda: vae.AutoencoderKL(TINY_VAE, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)

  def fill(v):
    fan_in = np.prod(v.shape[:-1]) if len(v.shape) > 1 else 10.0
    return jax.numpy.asarray(rng.normal(size=v.shape) / np.sqrt(fan_in), np.float32)
  return nnx.merge(graphdef, jax.tree.map(fill, state))


class _Interrupt(Exception):
  pass


def test_extract_resume_and_loader(tmp_path, image_folder_dir, tiny_vae):
  config = _config('image_folder', image_folder_dir)
  out = str(tmp_path / 'latents')
  kw = dict(shard_size=4, per_device_batch=3, num_threads=2, model=tiny_vae)
  written = []

  def interrupt_after_three(k):
    written.append(k)
    if len(written) == 3:
      raise _Interrupt
  with pytest.raises(_Interrupt):
    extract.run(config, out, on_shard_done=interrupt_after_three, **kw)
  with open(os.path.join(out, latents.META)) as f:
    assert not json.load(f)['complete']
  with pytest.raises(ValueError, match='not finished'):
    latents.LatentSource(out)
  # A partial shard left by the interruption must be rewritten, not trusted.
  partial = os.path.join(out, latents.shard_name(3, 6) + '.tmp')
  with open(partial, 'wb') as f:
    f.write(b'garbage')
  resumed = []
  meta = extract.run(config, out, on_shard_done=resumed.append, **kw)
  assert written == [0, 1, 2] and resumed == [3, 4, 5]
  assert meta['complete'] and meta['num_images'] == 21 and meta['latent_shape'] == [16, 16, 4]
  assert not os.path.exists(partial)

  # Records: every index once, and the stored moments are the encoder's for image and flip.
  src = latents.LatentSource(out)
  assert len(src) == 21
  from array_record.python import array_record_module
  seen = []
  for k in range(6):
    reader = array_record_module.ArrayRecordReader(os.path.join(out, latents.shard_name(k, 6)))
    for rec in reader.read_all():
      seen.append(latents.decode_record(rec, src.moments_shape)[0])
  assert sorted(seen) == list(range(21))
  image = extract.image_source(config)[13]['image']
  x = transforms.to_unit_range(np.stack([image, image[:, ::-1]]))
  mean, logvar = tiny_vae.encode(x)
  stored = src[13]['moments']
  assert src[13]['y'] == 1  # 'bee' (second sorted class)
  np.testing.assert_allclose(stored[:, 0], mean, atol=1e-5)
  np.testing.assert_allclose(stored[:, 1], logvar, atol=1e-5)

  # Rerunning with different settings into the same directory is refused.
  with pytest.raises(ValueError, match='different extraction'):
    extract.run(config, out, **{**kw, 'shard_size': 5})

  # Loader: checkpoint the iterator state and resume to the same next batches.
  config = _config('latents', out)
  assert data.latent_shape(config) == (16, 16, 4)
  it = data.make_train_iterator(config, global_batch_size=4, seed=1)
  for _ in range(3):
    b = next(it)
  assert b['x'].shape == (4, 16, 16, 4) and b['x'].dtype == np.float32 and b['y'].shape == (4,)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  restored = data.make_train_iterator(config, global_batch_size=4, seed=1)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(got['x'], want['x'])
    np.testing.assert_array_equal(got['y'], want['y'])

  # A few train steps straight from the latent shards (the 'latents' source of main).
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  from ppflow_jax import loop, sharding  # pylint: disable=g-import-not-at-top
  from ppflow_jax.train import Trainer  # pylint: disable=g-import-not-at-top
  train_config = tiny_config(2, channels=4)
  train_config.data.update(source='latents', path=out)
  trainer = Trainer(train_config, sharding.make_mesh(train_config))
  train_state = trainer.init_state()
  it = data.make_train_iterator(train_config, global_batch_size=8)
  for _ in range(3):
    train_state, metrics = trainer.step(train_state, loop.global_batch(next(it), trainer))
    assert np.isfinite(float(metrics['loss']))
  assert int(train_state.step) == 3

  # The count check catches a lost shard.
  os.remove(os.path.join(out, latents.index_name(2, 6)))
  with pytest.raises(RuntimeError, match='shard 2 missing'):
    extract.verify(out, meta)


def test_sample_latent_transform():
  rng = np.random.default_rng(0)
  moments = rng.normal(size=(64, 2, 2, 4, 4, 2)).astype(np.float32)
  moments[:, :, 1] = -4.0  # logvar: std = exp(-2)
  moments[:, 1, 0] = moments[:, 0, 0, :, ::-1] + 100.0  # flipped view, recognisable
  batch = {'moments': moments, 'y': np.arange(64, dtype=np.int32)}
  out = latents.SampleLatent(0.5, flip=True)(batch, np.random.default_rng(1))
  z = out['x'] / 0.5
  is_flip = z.mean(axis=(1, 2, 3)) > 50
  assert 10 < is_flip.sum() < 54
  mean = np.where(is_flip[:, None, None, None], moments[:, 1, 0], moments[:, 0, 0])
  err = z - mean
  assert 0.8 * np.exp(-2) < err.std() < 1.2 * np.exp(-2)  # a posterior sample, not the mean
  no_flip = latents.SampleLatent(0.5, flip=False)(batch, np.random.default_rng(1))
  assert np.all(np.abs(no_flip['x'] / 0.5 - moments[:, 0, 0]) < 1.0)


def test_record_roundtrip_and_errors(tmp_path):
  m = np.random.default_rng(0).normal(size=(2, 2, 3, 3, 4)).astype(np.float32)
  index, label, back = latents.decode_record(latents.encode_record(123456789012, 7, m), m.shape)
  assert (index, label) == (123456789012, 7)
  np.testing.assert_array_equal(back, m)
  with pytest.raises(FileNotFoundError, match='ppflow_jax.data.extract'):
    latents.read_meta(str(tmp_path))
  config = _config('latents', str(tmp_path))
  config.data.source = 'nope'
  with pytest.raises(ValueError, match='must be one of'):
    data.make_train_iterator(config, global_batch_size=4)
