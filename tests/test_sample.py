"""The sampling command and Pipeline: a tiny SiT-layout .pt served from 127.0.0.1, downloaded,
converted once (then cached), sampled with the config's sampler, decoded by a tiny VAE, a PNG."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT
from tests.http_server import Files, serve
from ppflow_jax import config_lib, errors, weights
from ppflow_jax.sample import Pipeline, parse_labels

TINY = ['--config.model.depth=2', '--config.model.hidden_size=64', '--config.model.num_heads=4',
        '--config.latent.height=8', '--config.latent.width=8', '--config.sample.num_steps=4']


def tiny_config():
  c = config_lib.load_config('sit_xl_2')
  c.model.update(depth=2, hidden_size=64, num_heads=4)
  c.latent.update(height=8, width=8)
  c.sample.num_steps = 4
  return c


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """{'sit': bytes of a random tiny SiT-layout .pt, 'vae': a tiny diffusers VAE directory}."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
  from third_party.torch_ref import TorchPPF  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp('sample_files')
  c = config_lib.resolve(tiny_config())
  torch.manual_seed(0)
  sit = TorchPPF(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                 num_heads=4, num_classes=c.model.num_classes, learn_sigma=True)
  with torch.no_grad():  # SiT zero-initialises adaLN and the output layer: randomise all
    for name, p in sit.named_parameters():
      if not name.startswith('pos_embed'):
        p.normal_(0.0, 0.05)
  buffer = io.BytesIO()
  torch.save(sit.state_dict(), buffer)
  vae_dir = str(d / 'tiny-vae')
  AutoencoderKL(block_out_channels=(8, 16), down_block_types=('DownEncoderBlock2D',) * 2,
                up_block_types=('UpDecoderBlock2D',) * 2, layers_per_block=1, latent_channels=4,
                norm_num_groups=4).save_pretrained(vae_dir)
  return {'sit': buffer.getvalue(), 'vae': vae_dir}


def test_command_downloads_converts_samples_and_writes_png(files, tmp_path):
  """The weights from a URL, the VAE as SiT's default `--vae=mse` (stabilityai/sd-vae-ft-mse)
  through huggingface_hub, both served by the local server."""
  out = tmp_path / 'sample.png'
  vae_files = {f: open(os.path.join(files['vae'], f), 'rb').read()
               for f in os.listdir(files['vae'])}
  with serve(Files({'/SiT-tiny.pt': files['sit']},
                   hub={'stabilityai/sd-vae-ft-mse': vae_files})) as base:
    env = dict(os.environ, PPFLOW_CACHE=str(tmp_path / 'cache'), JAX_PLATFORMS='cpu',
               PYTHONPATH=ROOT, HF_ENDPOINT=base, HF_HUB_CACHE=str(tmp_path / 'hf'),
               HF_HUB_DISABLE_TELEMETRY='1')
    p = subprocess.run([sys.executable, '-m', 'ppflow_jax.sample', f'--ckpt={base}/SiT-tiny.pt',
                        '--config=sit_xl_2', *TINY, '--class_labels=207,360,387', '--seed=0',
                        f'--out={out}'],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert (tmp_path / 'hf' / 'models--stabilityai--sd-vae-ft-mse').is_dir()
  assert 'converted ' in p.stdout and 'sde, 4 grid points, CFG [1.5]' in p.stdout, p.stdout
  assert 'sampled in ' in p.stdout and f'wrote {out}' in p.stdout
  image = np.asarray(Image.open(out))
  assert image.shape == (16, 48, 3) and image.std() > 0  # 3 images of 8x8 latents, x2 VAE

  # The same weights again, in Python: the cached conversion, the same images.
  os.environ['PPFLOW_CACHE'] = str(tmp_path / 'cache')
  try:
    said = []
    pipe = Pipeline.from_pretrained(weights.resolve(str(tmp_path / 'cache' / 'SiT-tiny.pt')),
                                    config=tiny_config(), vae=files['vae'], say=said.append)
  finally:
    del os.environ['PPFLOW_CACHE']
  assert said and said[0].endswith('(cached)')
  images = pipe([207, 360, 387], seed=0)
  np.testing.assert_array_equal(np.concatenate(list(images), axis=1), image)


def test_released_name_uses_its_config(files, tmp_path, monkeypatch):
  monkeypatch.setenv('PPFLOW_CACHE', str(tmp_path / 'cache'))
  with serve(Files({'/SiT.pt': files['sit']})) as base:
    monkeypatch.setitem(weights.REGISTRY, 'SiT-XL-2-256x256.pt', weights.Release(
        'SiT-XL-2-256x256.pt', base + '/SiT.pt', 'sit_xl_2'))
    pipe = Pipeline.from_pretrained('SiT-XL-2-256x256', config=tiny_config(), vae=None,
                                    progress=False, say=lambda _: None)
  latents = pipe.latents([1, 2], seed=3)
  assert latents.shape == (2, 8, 8, 4) and np.isfinite(latents).all()
  with pytest.raises(errors.UserError, match='cannot be sampled'):
    Pipeline.from_pretrained('DiT-XL-2-256x256.pt')
  mine = tmp_path / 'mine.pt'
  mine.write_bytes(files['sit'])
  with pytest.raises(errors.UserError, match='give its config too'):
    Pipeline.from_pretrained(str(mine))


def test_labels_are_checked():
  assert parse_labels('207, 360,387') == [207, 360, 387]
  with pytest.raises(errors.UserError, match='comma-separated'):
    parse_labels('a,b')
  with pytest.raises(errors.UserError, match=r'outside \[0, 1000\)'):
    parse_labels('5,1000', 1000)


def test_pipeline_samples_like_a_sampler_built_by_hand():
  """Pipeline -> Inference -> sampler: the same latents, bit for bit, as the per-stage sampler
  built directly (what Pipeline did before it went through Inference); the sampler is kept."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ppflow_jax import sampling, stages  # pylint: disable=g-import-not-at-top
  from ppflow_jax.models import build_model  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config('ppf_xl_2')
  c.model.update(depth=2, hidden_size=64, num_heads=4)
  c.latent.update(height=8, width=8)
  c.sample.num_steps = 5
  c = config_lib.resolve(c)
  graphdef, state = nnx.split(build_model(c, nnx.Rngs(1)))
  rng = np.random.default_rng(0)  # SiT zero-initialises the output layers: randomise all
  params = jax.tree.map(lambda a: (0.05 * rng.normal(size=a.shape)).astype(np.float32),
                        nnx.to_pure_dict(state))
  pipe = Pipeline.from_params(c, params)
  got = pipe.latents([1, 2, 3], seed=4)
  noise, keys = sampling.index_noise((8, 8, 4), np.arange(3), 4)
  by_hand = sampling.Sampler(graphdef, stages.from_config(c), sampling.SamplerSpec.from_config(c),
                             c.model.num_classes).sample(params, noise, np.array([1, 2, 3]), keys)
  np.testing.assert_array_equal(got, np.asarray(by_hand))
  assert np.abs(got - np.asarray(noise)).max() > 0.1  # the model moved the noise
  traced = pipe.model.sampler().trace_count
  pipe.latents([3, 1, 2], seed=5)
  assert pipe.model.sampler().trace_count == traced  # the second call compiles nothing
