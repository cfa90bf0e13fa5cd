"""One path abstraction for local paths and URLs (paths.py), tested on a local directory and on
an in-memory file system registered for gs:// (no network): run files, metrics, TensorBoard
events, PNGs and latent metadata go through the same calls, and no local `gs:` directory appears."""

from __future__ import annotations

import importlib
import io
import json
import os

import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from ppflow_jax import errors, paths, report, summary
from ppflow_jax.data import latents


class FakeGCS(MemoryFileSystem):
  """fsspec's in-memory file system answering gs:// URLs the way gcsfs does (bucket/key names)."""
  protocol = ('gs', 'gcs')
  store = {}
  pseudo_dirs = ['']

  @classmethod
  def _strip_protocol(cls, path):
    return MemoryFileSystem._strip_protocol(path.replace('gs://', '', 1))

  def walk(self, path, *args, **kwargs):  # folders named bucket/key, as gcsfs names them
    for folder, dirs, files in super().walk(path, *args, **kwargs):
      yield folder.lstrip('/'), dirs, files


@pytest.fixture(params=['local', 'gs'])
def root(request, tmp_path, monkeypatch):
  """A run directory: a local path, or gs://bucket/run served from memory."""
  monkeypatch.chdir(tmp_path)
  if request.param == 'local':
    yield str(tmp_path / 'run')
    return
  monkeypatch.setenv('EPATH_USE_TF', 'false')
  registry = importlib.import_module('fsspec.registry')._registry  # pylint: disable=protected-access
  for name in ('gs', 'gcs'):
    monkeypatch.setitem(registry, name, FakeGCS)
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = ['']  # directories made by an earlier test
  yield 'gs://bucket/run'
  assert not any('gs:' in d for _, dirs, _ in os.walk(tmp_path) for d in dirs), 'local gs: dir'
  assert any(k.startswith('/bucket/run/') for k in FakeGCS.store), 'nothing went to gs://'
  FakeGCS.store.clear()


def test_files_round_trip(root):
  paths.makedirs(root)
  assert paths.absolute(root) == (root if root.startswith('gs://') else os.path.abspath(root))
  f = paths.join(root, 'sub', 'a.txt')
  paths.makedirs(paths.join(root, 'sub'))
  paths.write_text(f, 'x\n')
  paths.append_text(f, 'y\n')
  assert paths.read_text(f) == 'x\ny\n' and paths.exists(f) and paths.isdir(paths.join(root, 'sub'))


def test_run_writer_metrics_and_tensorboard(root):
  paths.makedirs(root)
  writer = summary.RunWriter(root, enabled=True)
  for step in (1, 2, 3):
    writer.scalars(step, {'loss': 1.0 / step, 'loss_stage0': 2.0, 'lr': 1e-4,
                          'images_per_sec': 10.0})
  writer.image(3, 'samples/ema', np.full((8, 12, 3), 200, np.uint8))
  writer.close()
  events = summary.read_events(paths.join(root, summary.TENSORBOARD))
  assert [s for s, _ in events['loss/total']] == [1, 2, 3]
  assert events['loss/stage0'][0][1] == 2.0 and events['train/lr'][0][1] == pytest.approx(1e-4)
  assert events['perf/images_per_sec'][2] == (3, 10.0)
  assert events['samples/ema'][0][1].shape == (8, 12, 3)
  # A resumed run (from step 2) drops the records of lost steps.
  summary.RunWriter(root, enabled=True, resume_step=2).close()
  lines = paths.read_text(paths.join(root, summary.METRICS)).splitlines()
  assert [json.loads(l)['step'] for l in lines] == [1, 2]


def test_png_and_latent_metadata(root):
  paths.makedirs(root)
  report.save_png(np.arange(48, dtype=np.uint8).reshape(4, 4, 3), paths.join(root, 'g.png'))
  img = Image.open(io.BytesIO(paths.as_path(paths.join(root, 'g.png')).read_bytes()))
  assert img.size == (4, 4)
  paths.write_text(paths.join(root, latents.META), json.dumps(
      {'format': latents.FORMAT, 'complete': True, 'num_shards': 1}))
  assert latents.read_meta(root)['num_shards'] == 1


def test_walk_names_nested_files_under_the_root(root):
  for name in ('a/1.png', 'a/deep/2.png', 'b/3.png'):
    paths.makedirs(paths.join(root, os.path.dirname(name)))
    paths.write_bytes(paths.join(root, name), b'x')
  found = sorted((folder, sorted(files)) for folder, _, files in paths.walk(root))
  assert found == [(root, []), (paths.join(root, 'a'), ['1.png']),
                   (paths.join(root, 'a', 'deep'), ['2.png']), (paths.join(root, 'b'), ['3.png'])]
  assert paths.read_bytes(paths.join(found[2][0], '2.png')) == b'x'



@pytest.mark.parametrize('bad', ['gs:/bucket/run', './gs:/bucket/run', '/work/s3:/b'])
def test_url_that_lost_a_slash_is_refused(bad):
  with pytest.raises(errors.UserError, match='lost a slash'):
    paths.makedirs(bad)
