"""The one path abstraction for workdirs, checkpoints, data and latents: `etils.epath`.

A path is a local file name or a URL of any file system epath serves (`gs://bucket/run` on Cloud
Storage through fsspec/gcsfs or tf.io.gfile, `s3://`, ...). orbax and tfds take the same strings
natively, so a `gs://` workdir needs no gcsfuse mount (a mount still works: it is a local path).
ArrayRecord shards are the exception: array_record opens them with its own C++ file layer, which
reads local files and `gs://` (its own Cloud Storage client) only (data/latents.py checks).
Helpers here never pass a URL through `os.path.abspath` or `os.makedirs`, which would turn
`gs://b/run` into a local directory `./gs:/b/run`; `check` refuses such mangled names outright.

Object stores cannot append: `append_text` rewrites the whole (small) object, and
`TensorBoard` event files go through `register_tensorboard_writer`, which does the same on flush.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
from typing import BinaryIO, Iterator

import numpy as np
from etils import epath

from ppflow_jax import errors

# `gs:/b/x` or `./gs:/b/x`: a URL that lost a slash to a path normalisation.
_MANGLED_URL = re.compile(r'(^|/)([a-z][a-z0-9+.-]*):/(?!/)')


def is_url(path) -> bool:
  """True for `scheme://...` names (gs://, s3://, memory://), False for local paths."""
  return '://' in os.fspath(path)


def check(path, what: str = 'path') -> str:
  """Returns `path` as a string; raises UserError for a URL mangled into a local name."""
  text = os.fspath(path)
  m = None if is_url(text) else _MANGLED_URL.search(text)
  if m:
    raise errors.UserError(
        f'{what}={text!r} looks like a {m[2]}:// URL that lost a slash (a local directory '
        f'"{m[2]}:" would be created); pass the URL itself, e.g. {m[2]}://bucket/dir')
  return text


def as_path(path, what: str = 'path') -> epath.Path:
  """An epath.Path for a local path or a URL (checked by `check`)."""
  return epath.Path(check(path, what))


def absolute(path, what: str = 'path') -> str:
  """URLs unchanged; local paths made absolute (what orbax needs)."""
  text = check(path, what)
  return text if is_url(text) else os.path.abspath(text)


def join(base, *parts: str) -> str:
  """`base/part/...` as a string, for local paths and URLs alike."""
  return os.fspath(epath.Path(check(base)).joinpath(*parts))


def makedirs(path) -> str:
  as_path(path).mkdir(parents=True, exist_ok=True)
  return os.fspath(path)


def _web(path) -> bool:
  """http(s) URLs name downloads (weights.py), not directories or files of a file system."""
  return os.fspath(path).startswith(('http://', 'https://'))


def exists(path) -> bool:
  return not _web(path) and as_path(path).exists()


def isdir(path) -> bool:
  return not _web(path) and as_path(path).is_dir()


def read_text(path) -> str:
  return as_path(path).read_text()


def write_text(path, text: str) -> None:
  as_path(path).write_text(text)


def read_bytes(path) -> bytes:
  return as_path(path).read_bytes()


def write_bytes(path, data: bytes) -> None:
  as_path(path).write_bytes(data)


@contextlib.contextmanager
def open_atomic(path) -> Iterator[BinaryIO]:
  """A binary file to write `path` through; readers see the old file or all of the new one,
  never a part: a local file is written beside and renamed over when the block ends, an object
  store publishes the object when it is closed."""
  text = check(path)
  if is_url(text):
    with as_path(text).open('wb') as f:
      yield f
    return
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(text)), suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      yield f
    os.replace(tmp, text)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def save_npz(path, **arrays) -> None:
  """np.savez to `path`, atomically (`open_atomic`)."""
  with open_atomic(path) as f:
    np.savez(f, **arrays)


def load_npz(path) -> np.lib.npyio.NpzFile:
  """np.load of a local or remote .npz, read whole (use as a context manager)."""
  return np.load(io.BytesIO(read_bytes(path)))


def glob(directory, pattern: str) -> list[str]:
  """Sorted names `directory/<match>` of `pattern` (e.g. 'chunk_*.npz'), local or URL."""
  return sorted(os.fspath(p) for p in as_path(directory).glob(pattern))


def walk(directory) -> Iterator[tuple[str, list[str], list[str]]]:
  """os.walk for a local path or a URL: (folder, subfolder names, file names), in listing order.
  etils' fsspec backend yields folders without their scheme (`bucket/dir`); it is put back."""
  text = check(directory)
  scheme = text.split('://', 1)[0] + '://' if is_url(text) else ''
  for folder, dirs, files in as_path(text).walk():
    name = os.fspath(folder)
    yield (name if name.startswith(scheme) else scheme + name), dirs, files


def append_text(path, text: str) -> None:
  """Appends `text`: in place on local files, by rewriting the object on object stores."""
  p = as_path(path)
  if not is_url(path):
    with open(p, 'a') as f:
      f.write(text)
    return
  p.write_text((p.read_text() if p.exists() else '') + text)


class _EpathRecordWriter:
  """A tensorboardX record writer for URLs: buffers the file and rewrites it on flush."""

  def __init__(self, path: str):
    self.path = epath.Path(path)
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    self.path.write_bytes(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathWriterFactory:
  def open(self, path: str) -> _EpathRecordWriter:
    return _EpathRecordWriter(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def register_tensorboard_writer(scheme: str) -> None:
  """Lets tensorboardX write event files under `scheme://` URLs through epath."""
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  record_writer.register_writer_factory(scheme, _EpathWriterFactory())
