"""FID sampling (evaluation/sample.py): index sharding over devices and processes, resumption,
per-index determinism across batch size and device count, the ADM .npz and the eval card.

The 8-device run needs `--xla_force_host_platform_device_count=8` before JAX starts, so it runs
in a subprocess that writes its sample batch; the tests compare it with 1-device runs here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ppflow_jax import checkpoint, sharding, train
from ppflow_jax.evaluation import sample
from tests.helpers import ROOT, tiny_config

N = 20


def fid_config(batch_size: int, **eval_overrides):
  c = tiny_config(2)
  # SDE: exercises both per-index streams (initial noise and the Euler-Maruyama keys).
  c.sample.update(method='sde', num_steps=4, batch_size=batch_size)
  c.eval.update(num_samples=N, fmnist_fid=False, **eval_overrides)
  return c


def write_params(workdir: str, config) -> None:
  """A randomly initialised model, perturbed so that zero-initialised output layers do not make
  every sample equal to its noise (labels and time must matter)."""
  trainer = train.Trainer(config, sharding.make_mesh(config))
  params = jax.device_get(trainer.init_state().params)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype), params)
  checkpoint.save_params(workdir, params, config)


_SCRIPT = textwrap.dedent('''
  import json, sys
  import jax, numpy as np
  from tests.test_fid_sampling import N, fid_config, write_params
  from ppflow_jax import sharding
  from ppflow_jax.evaluation import sample

  assert len(jax.devices()) == 8, jax.devices()
  workdir, out = sys.argv[1], {}
  # Index sharding: 2 simulated processes owning 4 devices each, on a pure data mesh and on a
  # mesh whose tensor axis replicates rows (they must count once).
  for mesh in ((8, 1, 1), (2, 2, 2)):
    c = fid_config(8)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    bs = sharding.batch_sharding(sharding.make_mesh(c), 1)
    seen = []
    for p in (0, 1):
      rows = sample.process_rows(bs, 8, p, device_process=lambda d: d.id // 4)
      for chunk in range(sample.num_chunks(N, 8)):
        idx = sample.chunk_indices(chunk, 8)[rows]
        seen += [int(i) for i in idx if i < N]
    out[str(mesh)] = seen
  c = fid_config(8)
  write_params(workdir, c)
  card = sample.run(c, workdir)
  out['card'] = card
  print('RESULT' + json.dumps(out))
''')


@pytest.fixture(scope='module')
def eight_device_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('eight'))
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, '-c', _SCRIPT, workdir], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith('RESULT'))
  return workdir, json.loads(line[len('RESULT'):])


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  """An uninterrupted 1-device run with batch 4 (5 chunks), with a reference-batch file."""
  workdir = str(tmp_path_factory.mktemp('ref'))
  ref = os.path.join(workdir, 'ref.npz')
  np.savez(ref, mu=np.zeros(3))
  c = fid_config(4, reference_batch=ref)
  write_params(workdir, c)
  card = sample.run(c, workdir)
  return workdir, c, card


def load_batch(card: dict) -> tuple[np.ndarray, np.ndarray]:
  with np.load(card['samples_file']) as f:
    return f['arr_0'], f['arr_1']


def test_labels():
  u = sample.index_labels('uniform', 1000, 10, seed=0)
  assert u.min() == 0 and u.max() == 9 and 60 < np.bincount(u).min()  # roughly uniform
  np.testing.assert_array_equal(u[:100], sample.index_labels('uniform', 100, 10, seed=0))
  assert not np.array_equal(u, sample.index_labels('uniform', 1000, 10, seed=1))
  b = sample.index_labels('balanced', 50_000, 1000, seed=0)
  np.testing.assert_array_equal(np.bincount(b), np.full(1000, 50))
  assert b[49] == 0 and b[50] == 1
  with pytest.raises(ValueError, match='divisible'):
    sample.index_labels('balanced', 55, 10, seed=0)


def test_index_noise_depends_only_on_the_index():
  from ppflow_jax import sampling  # pylint: disable=g-import-not-at-top
  shape = (16, 16, 2)
  noise, keys = sampling.index_noise(shape, np.arange(6), 3)
  sub_noise, sub_keys = sampling.index_noise(shape, np.arange(2, 6), 3)
  np.testing.assert_array_equal(np.asarray(noise[2:]), np.asarray(sub_noise))
  np.testing.assert_array_equal(jax.random.key_data(keys[2:]), jax.random.key_data(sub_keys))


def test_two_processes_cover_every_index_once(eight_device_run):
  _, out = eight_device_run
  for mesh in ('(8, 1, 1)', '(2, 2, 2)'):
    assert sorted(out[mesh]) == list(range(N)), mesh


def test_process_rows_split_between_processes():
  # One real device here: process 0 owns every row, process 1 none.
  c = fid_config(4)
  bs = sharding.batch_sharding(sharding.make_mesh(c), 1)
  np.testing.assert_array_equal(sample.process_rows(bs, 4, 0), np.arange(4))
  assert len(sample.process_rows(bs, 4, 1)) == 0


def test_adm_batch_and_per_index_determinism(eight_device_run, reference_run):
  """8 devices x batch 8 and 1 device x batch 4 give the same images for the same indices."""
  _, out = eight_device_run
  images8, labels8 = load_batch(out['card'])
  _, c, card = reference_run
  images1, labels1 = load_batch(card)
  assert images1.dtype == np.uint8 and images1.shape == (N, 16, 16, 2)
  np.testing.assert_array_equal(labels1, sample.index_labels('uniform', N, 5, c.seed))
  np.testing.assert_array_equal(labels8, labels1)
  # Distinct samples (the per-index noise differs), but the same ones in both runs; float
  # rounding may move a rare pixel across a quantization step.
  assert len({im.tobytes() for im in images1}) == N
  diff = np.abs(images8.astype(int) - images1.astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
  assert out['card']['device_count'] == 8 and card['device_count'] == 1


def test_eval_card(reference_run):
  workdir, c, card = reference_run
  with open(os.path.join(workdir, 'fid_samples', sample.CARD_FILE)) as f:
    assert json.load(f) == card
  assert card['checkpoint'] == os.path.join(workdir, checkpoint.PARAMS_DIR)
  assert card['checkpoint_step'] == 0 and card['weights'] == 'ema'
  assert card['sampler']['method'] == 'sde' and card['sampler']['num_steps'] == 4
  assert card['stage_cfg_scales'] == [1.0, 2.0]
  assert card['stage_patch_sizes'] == [[4, 4], [2, 2]] and card['stage_boundaries'] == [0.5]
  assert card['cfg_channels'] == 'all' and card['skip_unit_cfg'] is True
  assert card['precision'] == {'dtype': 'float32', 'param_dtype': 'float32', 'attention': 'auto'}
  assert card['sampler']['sde_last_step'] == 0.04 and card['sampler']['force_finest'] is False
  assert card['model_evaluations'] == 4 and card['forward_passes'] == 4 + 2  # stage 1 guided
  assert card['evaluator'] == dict(inception_preprocess='tf1', pr_distances='float16',
                                   is_split_size=5000, inception_weights=None)
  assert card['labels'] == 'uniform' and card['num_samples'] == N
  with open(c.eval.reference_batch, 'rb') as f:
    assert card['reference_batch_sha256'] == hashlib.sha256(f.read()).hexdigest()
  assert card['code_version'] is None or re.fullmatch('[0-9a-f]{40}', card['code_version'])
  assert card['jax_version'] == jax.__version__ and card['device_kind']
  assert card['samples_file'].endswith(f'samples_{N}x16x16x2.npz')


def test_interrupted_run_resumes_without_duplicates(tmp_path, reference_run):
  _, c, card = reference_run
  workdir = str(tmp_path)
  write_params(workdir, c)
  done = []

  def crash_after_two(chunk):
    done.append(chunk)
    if len(done) == 2:
      raise KeyboardInterrupt('simulated kill')

  with pytest.raises(KeyboardInterrupt):
    sample.run(c, workdir, on_chunk=crash_after_two)
  out_dir = os.path.join(workdir, 'fid_samples')
  assert sorted(os.listdir(out_dir)) == ['chunk_00000.npz', 'chunk_00001.npz']
  resumed = []
  card2 = sample.run(c, workdir, on_chunk=resumed.append)
  assert resumed == [2, 3, 4]  # finished chunks are not sampled again
  images, labels = load_batch(card2)
  ref_images, ref_labels = load_batch(card)
  np.testing.assert_array_equal(images, ref_images)
  np.testing.assert_array_equal(labels, ref_labels)
  # Chunks of another setting in the same directory are refused, not mixed in.
  c2 = fid_config(4)
  c2.seed = 7
  with pytest.raises(ValueError, match='other settings'):
    sample.run(c2, workdir)


def test_merge_detects_missing_index(tmp_path, reference_run):
  workdir, _, _ = reference_run
  out = str(tmp_path)
  for name in ('chunk_00000.npz', 'chunk_00002.npz'):
    with open(os.path.join(workdir, 'fid_samples', name), 'rb') as src:
      with open(os.path.join(out, name), 'wb') as dst:
        dst.write(src.read())
  with pytest.raises(ValueError, match='cover 8 of 20'):
    sample.merge_chunks(out, N)
