"""ImageNet-1k from tensorflow-datasets `imagenet2012` in array_record format, read without TensorFlow.

One-time preparation (in an environment that has TensorFlow; see docs/data.md):
  tfds build imagenet2012 --data_dir=DATA_DIR --manual_dir=DIR_WITH_ILSVRC2012_TARS \
      --file_format=array_record
Reading uses `tfds.data_source` (random access, PIL decoding) and grain; images get the ADM crop.
"""

from __future__ import annotations

import json

import numpy as np
from etils import epath
from PIL import Image

from ppflow_jax.data import transforms

BUILD = ('Build it once with `tfds build imagenet2012 --data_dir=DATA_DIR --manual_dir=TARS_DIR '
         '--file_format=array_record` (needs TensorFlow in that environment) and set '
         '--config.data.path=DATA_DIR.')


def check_data_dir(data_dir: str, split: str) -> None:
  """Raises FileNotFoundError (one line: what is wrong, what to do) unless `data_dir` holds an
  array_record build of imagenet2012 with `split`."""
  where = f'config.data.path={data_dir!r}'
  root = epath.Path(data_dir) / 'imagenet2012'
  if not epath.Path(data_dir).is_dir():
    raise FileNotFoundError(f'{where} is not a directory. {BUILD}')
  infos = sorted(root.glob('*/dataset_info.json')) if root.is_dir() else []
  if not infos:
    found = sorted(p.name for p in epath.Path(data_dir).iterdir())[:5]
    raise FileNotFoundError(f'{where} holds no imagenet2012/<version>/dataset_info.json (it holds '
                            f'{found or "nothing"}); point it at the --data_dir given to tfds '
                            f'build, not at the tars or a version directory. {BUILD}')
  info = json.loads(infos[-1].read_text())
  file_format = info.get('fileFormat', 'tfrecord')
  if file_format != 'array_record':
    raise FileNotFoundError(f'{infos[-1].parent} was built as {file_format}; random access needs '
                            f'array_record. {BUILD}')
  splits = [s['name'] for s in info.get('splits', [])]
  if split not in splits:
    raise FileNotFoundError(f'{infos[-1].parent} has the splits {splits}, not {split!r}.')


class ImageNetSource:
  """Random-access source of {'image': uint8 (S, S, 3) ADM-cropped, 'label': int32 ()}."""

  def __init__(self, data_dir: str, image_size: int, split: str = 'train'):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data_dir = data_dir or tfds.core.constants.DATA_DIR  # '' = tfds's default (~/tensorflow_datasets)
    check_data_dir(data_dir, split)
    self._source = tfds.data_source('imagenet2012', split=split, data_dir=data_dir,
                                    download=False)
    self.image_size = image_size

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    ex = self._source[index]
    image = transforms.center_crop_arr(Image.fromarray(ex['image']), self.image_size)
    return {'image': image, 'label': np.int32(ex['label'])}
