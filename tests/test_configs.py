"""Every shipped config loads, resolves and rejects bad overrides clearly."""

from __future__ import annotations

import glob
import os

import pytest

from ppflow_jax import config_lib, stages
from tests.helpers import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))


def load(path, arg=None):
  return config_lib.load_config(f'{path}:{arg}' if arg else path)


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_resolves(path):
  c = config_lib.resolve(load(path))
  assert c.model.depth > 0 and c.model.hidden_size % c.model.num_heads == 0


@pytest.mark.parametrize('name, patches, scales', [
    ('ppf_xl_2', ((4, 4), (2, 2)), (1.0, 3.0)),
    ('ppf_xl_3', ((4, 4), (2, 4), (2, 2)), (1.0, 3.5, 3.75)),
    ('ppf_b_2', ((4, 4), (2, 2)), (1.5, 3.5)),
    ('ppf_b_3', ((4, 4), (2, 4), (2, 2)), (1.5, 3.5, 4.0)),
])
def test_paper_models(name, patches, scales):
  c = config_lib.resolve(load(os.path.join(ROOT, 'configs', f'{name}.py')))
  assert tuple(map(tuple, c.schedule.patch_sizes)) == patches
  assert tuple(c.schedule.cfg_scales) == scales
  assert (c.latent.height, c.latent.width, c.latent.channels) == (32, 32, 4)
  assert c.train.lr == 1e-4 and c.train.weight_decay == 0 and c.train.batch_size == 256
  assert c.train.ema_decay == 0.9999 and c.model.class_dropout == 0.1


@pytest.mark.parametrize('name, method', [
    ('ppf_xl_2', 'heun'), ('ppf_xl_3', 'heun'), ('ppf_xl_2_512', 'heun'), ('ppf_xl_3_512', 'heun'),
    ('ppf_b_2', 'heun'), ('ppf_b_3', 'heun'), ('sit_xl_2', 'sde'), ('sit_b_2', 'sde'), ('sit_xl_2_512', 'sde'),
])
def test_paper_configs_sample_with_the_published_protocol(name, method):
  """Without overrides: 250 grid points, the published sampler, CFG on latent channels 0..2."""
  c = config_lib.resolve(load(os.path.join(ROOT, 'configs', f'{name}.py')))
  assert (c.sample.method, c.sample.num_steps, c.sample.cfg_channels) == (method, 250, 'legacy')
  assert c.model.dtype == 'float32' and c.sample.use_ema
  assert (c.eval.inception_preprocess, c.eval.pr_distances, c.eval.is_split_size) == (
      'tf1', 'float16', 5000)
  if name.startswith('sit'):
    assert tuple(c.schedule.cfg_scales) == (1.5,) and c.sample.sde_last_step == 0.04


def test_512_latent_and_b5_schedule():
  c = config_lib.resolve(load(os.path.join(ROOT, 'configs', 'ppf_xl_2_512.py')))
  assert c.latent.height == 64
  s = stages.from_config(config_lib.resolve(load(os.path.join(ROOT, 'configs', 'ppf_b_5.py'))))
  assert [s.num_tokens(i) for i in range(5)] == [16, 32, 64, 128, 256]


def test_runlocal_variant():
  c = config_lib.resolve(load(os.path.join(ROOT, 'configs', 'ppf_xl_2.py'), 'runlocal'))
  assert c.data.source == 'fashion_mnist' and c.model.depth == 2
  with pytest.raises(ValueError, match='runlocal'):
    load(os.path.join(ROOT, 'configs', 'ppf_xl_2.py'), 'fast')


@pytest.mark.parametrize('section, field, value, message', [
    ('model', 'dtype', 'float16', 'config.model.dtype'),
    ('model', 'num_heads', 7, 'not divisible by num_heads'),
    ('sample', 'method', 'rk4', r"config.sample.method='rk4' must be one of"),
    ('sample', 'method', 'dopri5', 'the run report compares fixed-grid'),  # final_report=True
    ('sample', 'rtol', -1.0, 'config.sample.rtol=-1.0 >= 0'),
    ('sample', 'cfg_channels', 'three', 'config.sample.cfg_channels'),
    ('train', 'regime', 'random', 'config.train.regime'),
    ('data', 'source', 'cifar', 'config.data.source'),
    ('train', 'batch_size', 0, r'config.train.batch_size=0 must be >= 1'),
    ('train', 'log_every', 0, r'config.train.log_every=0 must be >= 1'),
    ('checkpoint', 'every_steps', 0, r'config.checkpoint.every_steps=0 must be >= 1'),
    ('sample', 'batch_size', 0, r'config.sample.batch_size=0 must be >= 1'),
    ('mesh', 'fsdp', 0, r'config.mesh.fsdp=0 must be -1'),
])
def test_bad_values_rejected(section, field, value, message):
  c = load(os.path.join(ROOT, 'configs', 'default.py'))
  c[section][field] = value
  with pytest.raises(ValueError, match=message):
    config_lib.resolve(c)


def test_unknown_field_rejected():
  c = load(os.path.join(ROOT, 'configs', 'default.py'))
  c.lock()  # main's config_flags locks it: an override of a misspelt field fails
  with pytest.raises(AttributeError, match='stpes'):
    c.train.stpes = 3
