"""The tfds ImageNet source (data/imagenet.py) on a small fake `imagenet2012` written by the test
in tfds's own on-disk format: array_record shards of examples serialized by tfds's
ExampleSerializer with the real Imagenet2012 builder's features, plus its dataset_info.json.
Building the real dataset needs TensorFlow; reading it (what the trainer does) does not.

Covers JPEG decoding, the ADM crop, labels, the training stream sharded over processes,
resuming it from a saved position, and the errors for a missing or wrong data_dir.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from ppflow_jax import config_lib
from ppflow_jax import data
from ppflow_jax.data import imagenet
from ppflow_jax.data import transforms

# Non-square sizes of both orientations; the 70x150 one is halved by the crop's BOX pass.
SHAPES = [(40, 60), (52, 36), (70, 150), (33, 33), (48, 64), (64, 48), (90, 40), (37, 51)]
SIZE = 16


def _jpeg(shape, seed) -> bytes:
  rng = np.random.default_rng(seed)
  # Smooth gradients plus noise: a real-ish JPEG whose center differs from its borders.
  h, w = shape
  base = np.stack(np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h)), -1)
  image = np.concatenate([base, base[..., :1]], -1) + rng.normal(0, 20, (h, w, 3))
  buf = io.BytesIO()
  Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buf, 'JPEG', quality=90)
  return buf.getvalue()


@pytest.fixture(scope='module')
def fake_imagenet(tmp_path_factory) -> tuple[str, list[bytes], list[int]]:
  """A data_dir holding imagenet2012 (train: 8 images in 3 shards) -> (dir, jpegs, labels)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import example_serializer  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builder = tfds.builder('imagenet2012', data_dir=data_dir, file_format='array_record')
  features = builder.info.features
  serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
  jpegs = [_jpeg(s, i) for i, s in enumerate(SHAPES)]
  labels = [0, 999, 17, 3, 3, 512, 1, 42]
  os.makedirs(builder.data_dir)
  template = tfds.core.ShardedFileTemplate(data_dir=builder.data_dir, dataset_name='imagenet2012',
                                           split='train', filetype_suffix='array_record')
  bounds = [0, 3, 6, 8]
  for shard, path in enumerate(template.sharded_filepaths(len(bounds) - 1)):
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), 'group_size:1')
    for i in range(bounds[shard], bounds[shard + 1]):
      writer.write(serializer.serialize_example(features.encode_example(
          dict(image=jpegs[i], label=labels[i], file_name=f'n0000000{i}_{i}.JPEG'))))
    writer.close()
  builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name='train', shard_lengths=np.diff(bounds).tolist(), num_bytes=0,
      filename_template=template)]))
  builder.info.set_file_format('array_record')
  builder.info.write_to_directory(builder.data_dir)
  return data_dir, jpegs, labels


def _config(data_dir: str) -> config_lib.ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.data.update(source='imagenet', path=data_dir, image_size=SIZE, flip=False)
  c.vae.path = ''
  return c


def test_decoding_adm_crop_and_labels(fake_imagenet):
  data_dir, jpegs, labels = fake_imagenet
  source = imagenet.ImageNetSource(data_dir, SIZE)
  assert len(source) == len(jpegs)
  for i, (jpeg, label) in enumerate(zip(jpegs, labels)):
    ex = source[i]
    assert ex['image'].dtype == np.uint8 and ex['image'].shape == (SIZE, SIZE, 3)
    assert ex['label'].dtype == np.int32 and int(ex['label']) == label
    decoded = Image.open(io.BytesIO(jpeg)).convert('RGB')
    assert decoded.size == SHAPES[i][::-1]
    np.testing.assert_array_equal(ex['image'], transforms.center_crop_arr(decoded, SIZE))
  # The crop keeps the center: the long side's ends (dark left / bright right columns of the
  # horizontal gradient) are cut away, so the crop's mean sits near the image's middle value.
  wide = source[2]['image'][..., 0].astype(float)
  assert 90 < wide.mean() < 165 and wide[:, 0].mean() < wide[:, -1].mean()


def test_stream_sharded_over_processes_and_resumable(fake_imagenet):
  data_dir, _, labels = fake_imagenet
  config = _config(data_dir)
  whole = data.make_train_iterator(config, global_batch_size=4)
  shards = [data.make_train_iterator(config, global_batch_size=4, process_index=p,
                                     process_count=2) for p in range(2)]
  seen = []
  for _ in range(4):  # two epochs
    batch, parts = next(whole), [next(s) for s in shards]
    assert batch['x'].shape == (4, SIZE, SIZE, 3) and batch['x'].dtype == np.float32
    assert -1.0 <= batch['x'].min() and batch['x'].max() <= 1.0
    assert all(p['x'].shape == (2, SIZE, SIZE, 3) for p in parts)
    # Each process holds its rows of the global batch, and together they make it up.
    rows = {tuple(np.round(x, 5).ravel()[:32]) for p in parts for x in p['x']}
    assert rows == {tuple(np.round(x, 5).ravel()[:32]) for x in batch['x']}
    assert sorted(np.concatenate([p['y'] for p in parts]).tolist()) == sorted(batch['y'].tolist())
    seen += batch['y'].tolist()
  assert sorted(seen[:8]) == sorted(labels) == sorted(seen[8:])  # every image once per epoch

  # Resume: a new iterator set to a saved position continues the stream exactly.
  it = data.make_train_iterator(config, global_batch_size=4, process_index=1, process_count=2)
  next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = data.make_train_iterator(config, global_batch_size=4, process_index=1,
                                     process_count=2)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got['x'], want['x'])
    np.testing.assert_array_equal(got['y'], want['y'])


def test_missing_or_wrong_data_dir(tmp_path, fake_imagenet):
  data_dir = fake_imagenet[0]
  def refused(path, split='train') -> str:
    with pytest.raises(FileNotFoundError) as e:
      imagenet.ImageNetSource(str(path), SIZE, split=split)
    assert '\n' not in str(e.value)
    return str(e.value)
  msg = refused(tmp_path / 'nowhere')
  assert msg.startswith(f"config.data.path='{tmp_path / 'nowhere'}' is not a directory. ")
  assert 'tfds build imagenet2012' in msg and '--config.data.path=DATA_DIR' in msg
  # The ILSVRC tars' directory, or one level too deep, instead of tfds's data_dir.
  (tmp_path / 'tars').mkdir()
  (tmp_path / 'tars' / 'ILSVRC2012_img_train.tar').write_bytes(b'')
  assert "holds no imagenet2012/<version>/dataset_info.json (it holds " \
         "['ILSVRC2012_img_train.tar'])" in refused(tmp_path / 'tars')
  assert "(it holds ['5.1.0'])" in refused(os.path.join(data_dir, 'imagenet2012'))
  # The right data_dir but a split it does not hold.
  assert refused(data_dir, 'validation').endswith("has the splits ['train'], not 'validation'.")
  # Built in tfds's default tfrecord format (no random access).
  other = tmp_path / 'tfrecord'
  shutil.copytree(data_dir, other)
  info = other / 'imagenet2012' / '5.1.0' / 'dataset_info.json'
  info.write_text(json.dumps({**json.loads(info.read_text()), 'fileFormat': 'tfrecord'}))
  assert 'was built as tfrecord; random access needs array_record.' in refused(other)
