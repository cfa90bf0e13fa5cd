"""Images in class subfolders (`root/<class>/<image>`), as ImageNet-style ADM-cropped examples.

`root` is a local path or a URL (paths.py), e.g. gs://bucket/images.

Class ids follow the sorted subfolder names; image order is sorted by (class, file name), so an image's
index is stable and the latent extraction can name every image exactly once.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ppflow_jax import paths
from ppflow_jax.data import transforms

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.gif', '.tif', '.tiff', '.ppm')


class ImageFolderSource:
  """Random-access source of {'image': uint8 (S, S, 3) ADM-cropped, 'label': int32 ()}."""

  def __init__(self, root: str, image_size: int):
    if not root or not paths.isdir(root):
      raise FileNotFoundError(f'image folder {root!r} does not exist; set --config.data.path to a '
                              'directory with one subfolder of images per class')
    self.classes = sorted(p.name for p in paths.as_path(root).iterdir() if p.is_dir())
    if not self.classes:
      raise ValueError(f'{root} has no class subfolders (expected root/<class>/<image files>)')
    self.files, labels = [], []
    for label, name in enumerate(self.classes):
      # sorted by (folder, name): an image's index does not depend on the listing order
      for folder, _, names in sorted(paths.walk(paths.join(root, name))):
        for f in sorted(names):
          if f.lower().endswith(EXTENSIONS):
            self.files.append(paths.join(folder, f))
            labels.append(label)
    if not self.files:
      raise ValueError(f'{root}: no images with extensions {EXTENSIONS} under its class folders')
    self.labels = np.asarray(labels, np.int32)
    self.image_size = image_size

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    with paths.as_path(self.files[index]).open('rb') as f, Image.open(f) as im:
      image = transforms.center_crop_arr(im, self.image_size)
    return {'image': image, 'label': self.labels[index]}
