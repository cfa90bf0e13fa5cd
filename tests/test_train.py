"""Training: the loss falls, steps are deterministic, non-finite steps are not applied."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ppflow_jax import config_lib, flow, sharding, summary
from ppflow_jax.train import Trainer
from tests.helpers import ROOT, tiny_config


def fixture_batch(config, n=8, seed=0):
  """A learnable fixture: class-dependent smooth patterns plus small noise."""
  rng = np.random.default_rng(seed)
  h, w, c = config.latent.height, config.latent.width, config.latent.channels
  y = np.arange(n) % config.model.num_classes
  yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing='ij')
  x = np.stack([np.sin(3 * (k + 1) * xx) * np.cos(2 * yy) for k in y])[..., None].repeat(c, -1)
  x = x + 0.05 * rng.standard_normal(x.shape)
  return {'x': x.astype(np.float32), 'y': y.astype(np.int32)}


def make(config):
  trainer = Trainer(config, sharding.make_mesh(config))
  return trainer, trainer.init_state()


def test_loss_falls_on_fixture():
  c = tiny_config(2)
  c.train.update(lr=2e-3, warmup_steps=0)
  trainer, state = make(c)
  batch = fixture_batch(c)
  losses = []
  for _ in range(60):
    state, m = trainer.step(state, batch)
    losses.append(float(m['loss']))
  assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), losses
  assert int(state.step) == 60


def test_step_is_deterministic_and_ema_moves():
  c = tiny_config(3)
  trainer, s1 = make(c)
  _, s2 = make(c)
  batch = fixture_batch(c)
  s1, m1 = trainer.step(s1, batch)
  s2, m2 = trainer.step(s2, batch)
  assert float(m1['loss']) == float(m2['loss'])
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), s1.params, s2.params))
  d = c.train.ema_decay
  p0 = trainer.init_state()
  k = ('blocks', 0, 'mlp', 'fc1', 'kernel')
  get = lambda t: t[k[0]][k[1]][k[2]][k[3]][k[4]]
  np.testing.assert_allclose(get(s1.ema), d * get(p0.ema) + (1 - d) * get(s1.params), rtol=1e-6,
                             atol=1e-7)


def test_nonfinite_step_is_not_applied():
  c = tiny_config(2)
  trainer, state = make(c)
  bad = fixture_batch(c)
  bad['x'][0, 0, 0, 0] = np.nan
  before = jax.tree.map(np.asarray, state.params)
  state, m = trainer.step(state, bad)
  assert int(m['nonfinite']) == 1 and int(state.step) == 0
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.all(a == np.asarray(b))), before,
                                   state.params))


def test_bucketed_times_follow_stage_ranges():
  c = tiny_config(3)
  trainer, _ = make(c)
  ts = flow.sample_times(jax.random.key(0), trainer.schedule, (400, 200, 200))
  for t, stage in zip(ts, trainer.schedule.stages):
    assert float(t.min()) >= stage.t_start and float(t.max()) <= stage.t_end
    assert t.shape[0] in (400, 200)


def test_label_dropout_rate():
  y = jnp.zeros(20000, jnp.int32)
  dropped = flow.drop_labels(jax.random.key(0), y, 0.1, 1000)
  assert abs(float(jnp.mean(dropped == 1000)) - 0.1) < 0.01


def test_main_default_runlocal_end_to_end(tmp_path):
  """The quick-start entry point on the embedded data: train, report, grid, then --mode=sample."""
  workdir = tmp_path / 'wd'
  base = [sys.executable, '-m', 'ppflow_jax.main', '--config=configs/default.py:runlocal',
          f'--workdir={workdir}', '--config.train.steps=6', '--config.train.log_every=3',
          '--config.eval.fmnist_fid=False', '--config.sample.num_steps=4',
          '--config.train.sample_every=6']
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  for name in ('samples.png', 'loss.png', 'report.md', 'report.json', 'metrics.jsonl'):
    assert (workdir / name).exists(), name
  assert 'speed-up' in (workdir / 'report.md').read_text()
  # Like for like: both rows skip the unconditional pass on the scale-1.0 stage (t <= 0.5).
  rep = json.loads((workdir / 'report.json').read_text())
  groups = lambda row: sorted((tuple(g['patch']), g['passes'], g['evaluations'])
                              for g in rep[f'{row}_ms_per_evaluation'])
  assert groups('ppf') == [((2, 2), 2, 3), ((4, 4), 1, 3)]
  assert groups('finest') == [((2, 2), 1, 3), ((2, 2), 2, 3)]
  assert rep['ppf_forward_passes'] == rep['finest_forward_passes'] == 9
  assert rep['flops_speedup_bound'] == pytest.approx(1 / rep['flops_ratio'])
  assert rep['flops_ratio'] > rep['flops_ratio_without_cfg']  # guided passes are all 2x2
  # TensorBoard: every logged scalar at steps 3 and 6, the periodic grid as an image.
  events = summary.read_events(str(workdir / 'tensorboard'))
  for tag in ('loss/total', 'loss/stage0', 'loss/stage1', 'train/grad_norm', 'train/lr',
              'perf/images_per_sec', 'perf/steps_per_sec'):
    assert [s for s, _ in events[tag]] == [3, 6], tag
  assert all(np.isfinite(v) and v > 0 for _, v in events['loss/total'])
  lr = config_lib.load_config('default:runlocal').train.lr
  # float32 schedule arithmetic (CI saw 1.8e-6 relative). Warm-up: step 3 used lr(2).
  assert events['train/lr'][0][1] == pytest.approx(lr * 2 / 100, rel=1e-5)
  [(step, grid)] = events['samples/ema']
  assert step == 6 and grid.dtype == np.uint8 and grid.shape[0] > 32
  assert (workdir / 'samples_0000006.png').exists()
  out = subprocess.run(base + ['--mode=sample', '--class_labels=1,2,7'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert Image.open(workdir / 'samples.png').size == (3 * 64, 64)  # one row, 32 px at scale 2
  # Quiet by default: no absl/orbax INFO lines.
  assert ' INFO ' not in out.stderr and not any(l.startswith('I') and '] ' in l
                                                for l in out.stderr.splitlines()), out.stderr
