"""Images in class subfolders (`root/<class>/<image>`), as ImageNet-style ADM-cropped examples.

Class ids follow the sorted subfolder names; image order is sorted by (class, file name), so an image's
index is stable and the latent extraction can name every image exactly once.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ppflow_jax.data import transforms

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.gif', '.tif', '.tiff', '.ppm')


class ImageFolderSource:
  """Random-access source of {'image': uint8 (S, S, 3) ADM-cropped, 'label': int32 ()}."""

  def __init__(self, root: str, image_size: int):
    if not root or not os.path.isdir(root):
      raise FileNotFoundError(f'image folder {root!r} does not exist; set --config.data.path to a '
                              'directory with one subfolder of images per class')
    self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not self.classes:
      raise ValueError(f'{root} has no class subfolders (expected root/<class>/<image files>)')
    self.files, labels = [], []
    for label, name in enumerate(self.classes):
      for dirpath, _, names in sorted(os.walk(os.path.join(root, name))):
        for f in sorted(names):
          if f.lower().endswith(EXTENSIONS):
            self.files.append(os.path.join(dirpath, f))
            labels.append(label)
    if not self.files:
      raise ValueError(f'{root}: no images with extensions {EXTENSIONS} under its class folders')
    self.labels = np.asarray(labels, np.int32)
    self.image_size = image_size

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    with Image.open(self.files[index]) as im:
      image = transforms.center_crop_arr(im, self.image_size)
    return {'image': image, 'label': self.labels[index]}
