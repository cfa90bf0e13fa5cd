"""ImageNet-1k from tensorflow-datasets `imagenet2012` in array_record format, read without TensorFlow.

One-time preparation (in an environment that has TensorFlow; see docs/data.md):
  tfds build imagenet2012 --data_dir=DATA_DIR --manual_dir=DIR_WITH_ILSVRC2012_TARS \
      --file_format=array_record
Reading uses `tfds.data_source` (random access, PIL decoding) and grain; images get the ADM crop.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ppflow_jax.data import transforms


class ImageNetSource:
  """Random-access source of {'image': uint8 (S, S, 3) ADM-cropped, 'label': int32 ()}."""

  def __init__(self, data_dir: str, image_size: int, split: str = 'train'):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      self._source = tfds.data_source('imagenet2012', split=split, data_dir=data_dir or None,
                                      download=False)
    except Exception as e:  # tfds raises several types for a missing or non-array_record build.
      raise FileNotFoundError(
          f'imagenet2012 ({split}) in array_record format not found in data_dir={data_dir!r} '
          f'({type(e).__name__}: {e}). Build it once with `tfds build imagenet2012 '
          '--data_dir=DATA_DIR --manual_dir=TARS_DIR --file_format=array_record` (needs '
          'TensorFlow in that environment) and set --config.data.path=DATA_DIR.') from e
    self.image_size = image_size

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    ex = self._source[index]
    image = transforms.center_crop_arr(Image.fromarray(ex['image']), self.image_size)
    return {'image': image, 'label': np.int32(ex['label'])}
