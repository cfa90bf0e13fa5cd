"""A whole run on a gs:// workdir without network: train with checkpoints, resume, sample a grid
and FID samples, extract latents, all through the URL (paths.py, orbax, TensorStore), never a
local `gs:` directory.

The bucket is a local directory behind both storage layers a real run uses: fsspec (epath, hence
paths.py and orbax's metadata) gets a file system registered for gs:// that maps
`gs://bucket/key` to `<root>/bucket/key` (auto-creating parents, as an object store has no
directories); TensorStore, which orbax gives its own GCS driver for array data, gets the same
directory through its file driver (orbax's `gcs_utils.get_kvstore_for_gcs`). Orbax still treats
the path as GCS (commit-marker finalisation instead of renames), and the bucket's hierarchical
namespace lookup (a Cloud Storage API call) answers "off". array_record (grain's latent and tfds
shard reader) opens gs:// objects with its own Cloud Storage client (google-cloud-cpp, not fsspec);
it is pointed at the same directory through the client's CLOUD_STORAGE_EMULATOR_ENDPOINT by a
127.0.0.1 server answering the JSON API's ranged object reads (`_ObjectReads`).
"""

from __future__ import annotations

import http.server
import importlib
import json
import os
import re
import shutil
import threading
import types
import urllib.parse

import jax
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils

from ppflow_jax import aot, checkpoint, config_lib, errors, inference, loop, main, paths
from ppflow_jax import data, schedule_search, weights
from ppflow_jax.convert import torch_io
from ppflow_jax.data import extract, fashion_mnist, imagenet, latents
from ppflow_jax.evaluation import metrics
from ppflow_jax.experiments import compare, mini_repro
from tests.helpers import ROOT
from tests.test_data import _config as data_config
from tests.test_data import _write_idx as write_idx
from tests.test_data import image_folder_dir, tiny_vae  # noqa: F401  (fixtures)
from tests.test_imagenet import fake_imagenet  # noqa: F401  (fixture)

WORKDIR = 'gs://bucket/run'


class _ObjectReads(http.server.BaseHTTPRequestHandler):
  """GET /storage/v1/b/BUCKET/o/OBJECT?alt=media (Range: bytes=a-b, a- or -n) from `root`."""
  root = ''

  def log_message(self, *args):  # quiet
    pass

  def do_GET(self):  # pylint: disable=invalid-name
    url = urllib.parse.urlsplit(self.path)
    m = re.fullmatch(r'/(?:download/)?storage/v1/b/([^/]+)/o/(.+)', url.path)
    file = m and os.path.join(self.root, m[1], urllib.parse.unquote(m[2]))
    if not file or 'alt=media' not in url.query or not os.path.isfile(file):
      self.send_response(404)
      self.send_header('Content-Length', '0')
      self.end_headers()
      return
    with open(file, 'rb') as f:
      data = f.read()
    start, end = 0, len(data)
    first, _, last = self.headers.get('Range', '').removeprefix('bytes=').partition('-')
    if first or last:
      start = int(first) if first else max(0, len(data) - int(last))
      end = min(len(data), int(last) + 1) if first and last else len(data)
    self.send_response(206 if 'Range' in self.headers else 200)
    self.send_header('Content-Length', str(end - start))
    self.send_header('Content-Range', f'bytes {start}-{end - 1}/{len(data)}')
    self.end_headers()
    self.wfile.write(data[start:end])


@pytest.fixture
def bucket_root(tmp_path, monkeypatch):
  """The local directory behind gs:// (see the module docstring); checks no `gs:` dir appears."""
  root = str(tmp_path / 'fake_gcs')
  os.makedirs(root)

  class LocalGCS(LocalFileSystem):
    protocol = ('gs', 'gcs')

    def __init__(self, *args, **kwargs):
      kwargs.pop('finalize_on_close', None)
      super().__init__(*args, auto_mkdir=True, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
      path = os.fspath(path)
      if path.startswith(root):
        return path
      for prefix in ('gs://', 'gcs://'):
        path = path.removeprefix(prefix)
      return os.path.join(root, path.lstrip('/')).rstrip('/')

    def glob(self, path, **kwargs):  # epath adds 'gs://' to the names: give bucket/key ones
      return [os.path.relpath(p, root) for p in super().glob(path, **kwargs)]

    def walk(self, path, *args, **kwargs):  # folders named bucket/key, as gcsfs names them
      for folder, dirs, files in super().walk(path, *args, **kwargs):
        yield os.path.relpath(folder, root), dirs, files

  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('EPATH_USE_TF', 'false')
  registry = importlib.import_module('fsspec.registry')._registry  # pylint: disable=protected-access
  for name in ('gs', 'gcs'):
    monkeypatch.setitem(registry, name, LocalGCS)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  monkeypatch.setattr(gcs_utils, 'get_kvstore_for_gcs', lambda path: {
      'driver': 'file', 'path': os.path.join(root, path.removeprefix('gs://'))})
  monkeypatch.setattr(gcs_utils, 'get_bucket',
                      lambda name: types.SimpleNamespace(hierarchical_namespace_enabled=False))
  server = http.server.ThreadingHTTPServer(
      ('127.0.0.1', 0), type('Reads', (_ObjectReads,), {'root': root}))
  threading.Thread(target=server.serve_forever, daemon=True).start()
  monkeypatch.setenv('CLOUD_STORAGE_EMULATOR_ENDPOINT', f'http://127.0.0.1:{server.server_port}')
  yield root
  server.shutdown()
  server.server_close()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  made = [os.path.join(d, n) for d, dirs, _ in os.walk(tmp_path) for n in dirs if 'gs:' in n]
  assert not made, f'local gs: directories: {made}'


@pytest.mark.slow  # ~1 min: two short trainings, a sample grid and FID sampling on CPU.
def test_train_resume_and_sample_on_gs(bucket_root):
  config = config_lib.load_config('default:runlocal')  # Fashion-MNIST, 32x32x1
  config.model.update(depth=1, hidden_size=32, num_heads=2)
  config.train.update(steps=4, batch_size=8, log_every=2, final_report=False)
  config.checkpoint.update(every_steps=2, async_save=False)
  config.sample.update(num_steps=3, batch_size=4, num_images=4)
  config.eval.update(num_samples=6, fmnist_fid=False)
  _, state = loop.train_and_evaluate(config, WORKDIR)
  local = os.path.join(bucket_root, 'bucket', 'run')
  assert sorted(os.listdir(os.path.join(local, checkpoint.CHECKPOINTS))) == ['2', '4']
  assert os.path.getsize(os.path.join(local, 'metrics.jsonl')) > 0

  # The EMA read back from gs:// is the one trained; a longer run resumes from step 4.
  restored = inference.Inference.from_workdir(WORKDIR, config)
  assert restored.step == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params),
               jax.device_get(state.ema))
  config.train.steps = 6
  main.run(config, WORKDIR, 'train')
  lines = paths.read_text(f'{WORKDIR}/metrics.jsonl').splitlines()
  assert [json.loads(l)['step'] for l in lines] == [2, 4, 6]  # 1-4 were not trained again
  assert inference.Inference.from_workdir(WORKDIR, config).step == 6

  main.run(config, WORKDIR, 'sample')
  assert os.path.getsize(os.path.join(local, 'samples.png')) > 0
  main.run(config, WORKDIR, 'sample_fid')
  card = json.loads(paths.read_text(f'{WORKDIR}/fid_samples/eval_card.json'))
  assert card['checkpoint_step'] == 6 and card['samples_file'].startswith('gs://bucket/run/')
  with paths.load_npz(card['samples_file']) as f:
    assert f['arr_0'].shape[0] == 6 and f['arr_1'].shape == (6,)
  assert len(paths.glob(f'{WORKDIR}/fid_samples', 'chunk_*.npz')) == 2


def test_extract_latents_to_gs(bucket_root, image_folder_dir, tiny_vae):
  """`data.extract` from an image folder on gs:// to `--out=gs://...`: shards uploaded whole, meta
  and indices through paths.py, then read back from the bucket for training."""
  shutil.copytree(image_folder_dir, os.path.join(bucket_root, 'bucket', 'images'))
  config = data_config('image_folder', 'gs://bucket/images')
  remote, local = extract.image_source(config), extract.image_source(
      data_config('image_folder', image_folder_dir))
  assert [os.path.relpath(f, 'gs://bucket/images') for f in remote.files] == [
      os.path.relpath(f, image_folder_dir) for f in local.files]
  assert remote.labels.tolist() == local.labels.tolist() and len(remote) == 21
  np.testing.assert_array_equal(remote[20]['image'], local[20]['image'])
  out = 'gs://bucket/latents'
  kw = dict(shard_size=8, per_device_batch=4, num_threads=2, model=tiny_vae)
  meta = extract.run(config, out, **kw)
  assert meta['complete'] and meta['num_shards'] == 3 and latents.read_meta(out)['complete']
  # Training reads the shards straight from the bucket (grain -> array_record's GCS client), the
  # same records as through the bucket's directory.
  src = latents.LatentSource(out)
  local = latents.LatentSource(os.path.join(bucket_root, 'bucket', 'latents'))
  assert len(src) == len(local) == 21
  batch, want = src.get_batch(np.array([20, 0, 9])), local.get_batch(np.array([20, 0, 9]))
  np.testing.assert_array_equal(batch['moments'], want['moments'])
  np.testing.assert_array_equal(batch['y'], want['y'])
  it = data.make_train_iterator(data_config('latents', out), global_batch_size=4, seed=1)
  assert next(it)['x'].shape == (4, *meta['latent_shape'])
  # A shard that lost records on the bucket is caught by reading it back through that client.
  shard = os.path.join(bucket_root, 'bucket', 'latents', latents.shard_name(2, 3))
  shutil.copy(os.path.join(bucket_root, 'bucket', 'latents', latents.shard_name(1, 3)), shard)
  with pytest.raises(RuntimeError, match='shard 2: 8 records, 5 indices'):
    extract.verify(out, meta)
  os.remove(shard)
  done = []
  extract.run(config, out, on_shard_done=done.append, **kw)  # a rerun redoes the lost shard only
  assert done == [2]


def test_fashion_mnist_from_gs(bucket_root, tmp_path):
  raw = np.random.default_rng(0).integers(1, 256, (5, 28, 28))
  for root in (str(tmp_path / 'fmnist'), os.path.join(bucket_root, 'bucket', 'fmnist')):
    os.makedirs(root)
    write_idx(os.path.join(root, 'train-images-idx3-ubyte.gz'), raw, 2051)
    write_idx(os.path.join(root, 'train-labels-idx1-ubyte.gz'), np.arange(5) + 3, 2049)
  images, labels = fashion_mnist.load('gs://bucket/fmnist')
  assert images.shape == (5, 32, 32, 1) and labels.tolist() == [3, 4, 5, 6, 7]
  np.testing.assert_array_equal(images, fashion_mnist.load(str(tmp_path / 'fmnist'))[0])


def test_evaluator_reads_sample_and_reference_batches_from_gs(bucket_root):
  """evaluation.evaluate's readers stream .npz batches from the bucket (ranged reads)."""
  images = np.random.default_rng(0).integers(0, 256, size=(7, 8, 8, 3), dtype=np.uint8)
  local = os.path.join(bucket_root, 'bucket', 'eval')
  os.makedirs(local)
  np.savez_compressed(os.path.join(local, 'ref.npz'), arr_0=images, mu=np.zeros(4),
                      sigma=np.eye(4), mu_s=np.ones(3), sigma_s=np.eye(3))
  np.savez(os.path.join(local, 'samples.npz'), images)
  ref = metrics.load_reference_batch('gs://bucket/eval/ref.npz')
  assert ref.num_images == 7 and ref.sigma_s.shape == (3, 3)
  np.testing.assert_array_equal(np.concatenate(list(ref.iter_images(3))), images)
  np.testing.assert_array_equal(
      np.concatenate(list(metrics.iter_images('gs://bucket/eval/samples.npz', 4))), images)


def test_tfds_imagenet_from_gs(bucket_root, fake_imagenet):
  """An imagenet2012 tfds build on a bucket: metadata through epath, shards through array_record's
  Cloud Storage client; the same examples as from the local copy."""
  local_dir, _, labels = fake_imagenet
  shutil.copytree(local_dir, os.path.join(bucket_root, 'bucket', 'tfds'))
  source = imagenet.ImageNetSource('gs://bucket/tfds', 16)
  local = imagenet.ImageNetSource(local_dir, 16)
  assert len(source) == len(labels)
  for i in (0, len(labels) - 1):
    assert int(source[i]['label']) == labels[i]
    np.testing.assert_array_equal(source[i]['image'], local[i]['image'])


def test_latents_from_other_urls_are_refused(tmp_path):
  """array_record reads local files and gs:// only; another scheme would read as empty shards."""
  with pytest.raises(errors.UserError, match=r"config.data.path='s3://b/latents': array_record "
                     'reads latent shards from local paths and gs:// only'):
    latents.LatentSource('s3://b/latents')


def _committed(name: str) -> dict:
  with open(os.path.join(ROOT, 'docs', name)) as f:
    return json.load(f)


def test_result_writers_on_gs(bucket_root):
  """Every experiment's result writer, given gs:// directories: the objects land in the bucket
  (and the fixture checks that no local `gs:` directory appears). Inputs are the committed results."""
  rows = _committed('compare_results.json')
  compare.write_results(rows['rows'], rows['meta'], 'gs://bucket/compare')
  mini = _committed('mini_repro_results.json')
  mini_repro.write_results(mini, 'gs://bucket/mini')
  search = _committed('schedule_search_ppflow.json')
  schedule_search.write_results(search, 'gs://bucket/run/schedule_search')
  hlo = aot.write_hlo('gs://bucket/hlo', 'train/step', 'HloModule train_step\n')
  assert hlo == 'gs://bucket/hlo/train_step.hlo.txt'

  local = os.path.join(bucket_root, 'bucket')
  def read(name):
    with open(os.path.join(local, name)) as f:
      return f.read()
  assert json.loads(read('compare/compare.json'))['rows'] == rows['rows']
  assert read('compare/compare.md') == compare.markdown(rows['rows'], rows['meta'])
  assert json.loads(read('mini/results.json')) == mini
  assert read('mini/results.md') == mini_repro.markdown(mini)
  assert json.loads(read('run/schedule_search/search.json')) == search
  assert search['budgets'][0]['override'] + '\n' in read('run/schedule_search/override.txt')
  for png in ('mini/fid_vs_time.png', 'run/schedule_search/pareto.png'):
    with open(os.path.join(local, png), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', png
  assert read('hlo/train_step.hlo.txt') == 'HloModule train_step\n'

  # compare reads each variant's metrics.jsonl back through the bucket.
  assert compare.last_loss('gs://bucket/compare/PPF-2') is None
  paths.append_text('gs://bucket/compare/PPF-2/metrics.jsonl', '{"step": 1, "loss": 0.5}\n')
  assert compare.last_loss('gs://bucket/compare/PPF-2') == 0.5


def test_weights_cache_refuses_a_url(monkeypatch):
  """torch.load needs local files: a URL cache directory or weight file is one clear error, never
  `./gs:/...`."""
  monkeypatch.setenv('PPFLOW_CACHE', 'gs://bucket/cache')
  with pytest.raises(errors.UserError, match=r"PPFLOW_CACHE='gs://bucket/cache' is a URL.*local"):
    weights.cache_dir()
  monkeypatch.setenv('PPFLOW_CACHE', 'gs:/bucket/cache')
  with pytest.raises(errors.UserError, match='lost a slash'):
    weights.cache_dir()
  with pytest.raises(errors.UserError, match=r"'gs://bucket/PPF-XL-2.pt': weight files are read "
                     'from local disk'):
    weights.resolve('gs://bucket/PPF-XL-2.pt')
  with pytest.raises(errors.UserError, match='weight files are read from local disk'):
    torch_io.read_state_dict('gs://bucket/PPF-XL-2.pt')  # what init_from=gs://... reaches
