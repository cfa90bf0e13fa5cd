"""Parity of the NNX AutoencoderKL with diffusers' PyTorch one, and the importer's key checks."""

from __future__ import annotations

import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from ppflow_jax.convert import vae as vae_weights
from ppflow_jax.convert.torch_io import CheckpointMismatchError
from ppflow_jax.models import vae

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

TINY = dict(block_out_channels=(32, 64), down_block_types=('DownEncoderBlock2D',) * 2,
            up_block_types=('UpDecoderBlock2D',) * 2, layers_per_block=1, norm_num_groups=8,
            sample_size=32)


def _torch_vae(seed: int = 0, **kw):
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**{**TINY, **kw}).eval()
  # Default init leaves GroupNorm at (1, 0) and zero biases; randomize them so the test sees them.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module')
def saved_tiny(tmp_path_factory):
  model = _torch_vae()
  d = tmp_path_factory.mktemp('tiny_vae')
  model.save_pretrained(d)  # safetensors by default
  return model, str(d)


def test_parity_encode_decode(saved_tiny):
  model, path = saved_tiny
  ours = vae_weights.load_diffusers_vae(path)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 24, 3)).astype(np.float32)
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    ref_mean = dist.mean.permute(0, 2, 3, 1).numpy()
    ref_logvar = dist.logvar.permute(0, 2, 3, 1).numpy()
    z = np.random.default_rng(1).normal(size=ref_mean.shape).astype(np.float32)
    ref_dec = model.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1)
  mean, logvar = jax.jit(ours.encode)(x)
  dec = jax.jit(ours.decode)(z)
  assert mean.shape == (2, 16, 12, 4)
  np.testing.assert_allclose(mean, ref_mean, atol=1e-4, rtol=0)
  np.testing.assert_allclose(logvar, ref_logvar, atol=1e-4, rtol=0)
  np.testing.assert_allclose(dec, ref_dec.numpy(), atol=1e-4, rtol=0)
  assert np.abs(ref_dec.numpy()).mean() > 1e-2  # a non-trivial output


def test_bin_with_old_attention_names(tmp_path, saved_tiny):
  model, path = saved_tiny
  old = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  sd = {re.sub(r'(to_q|to_k|to_v|to_out\.0)\.', lambda m: old[m[1]] + '.', k): v
        for k, v in model.state_dict().items()}
  assert any('proj_attn' in k for k in sd)
  torch.save(sd, tmp_path / 'diffusion_pytorch_model.bin')
  with open(os.path.join(path, 'config.json')) as f:
    (tmp_path / 'config.json').write_text(f.read())
  a = nnx.state(vae_weights.load_diffusers_vae(str(tmp_path)))
  b = nnx.state(vae_weights.load_diffusers_vae(path))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_ldm_single_file_names():
  # LDM (CompVis) names: decoder.up is indexed from the lowest resolution, mid.attn_1 uses 1x1 convs.
  assert vae_weights._canonical_key('decoder.up.3.block.0.nin_shortcut.weight', 4) == \
      'decoder.up_blocks.0.resnets.0.conv_shortcut.weight'
  assert vae_weights._canonical_key('first_stage_model.encoder.mid.attn_1.proj_out.bias', 4) == \
      'encoder.mid_block.attentions.0.to_out.0.bias'
  assert vae_weights._canonical_key('encoder.down.2.downsample.conv.weight', 4) == \
      'encoder.down_blocks.2.downsamplers.0.conv.weight'
  w = np.arange(6.0).reshape(3, 2, 1, 1)
  np.testing.assert_array_equal(
      vae_weights._to_flax('encoder.mid_block.attentions.0.to_q.weight', w, 'kernel'), w[:, :, 0, 0].T)


def test_mismatched_keys_error(tmp_path, saved_tiny):
  model, path = saved_tiny
  sd = {k: v.clone() for k, v in model.state_dict().items()}
  del sd['decoder.conv_out.bias']
  sd['encoder.extra.weight'] = torch.zeros(3)
  sd['quant_conv.weight'] = torch.zeros(8, 8, 3, 3)
  from safetensors.torch import save_file
  save_file(sd, str(tmp_path / 'diffusion_pytorch_model.safetensors'))
  with open(os.path.join(path, 'config.json')) as f:
    (tmp_path / 'config.json').write_text(f.read())
  with pytest.raises(CheckpointMismatchError) as e:  # the one class of every importer
    vae_weights.load_diffusers_vae(str(tmp_path))
  msg = str(e.value)
  assert 'missing (1): decoder.conv_out.bias' in msg
  assert 'unexpected (1): encoder.extra.weight' in msg
  assert 'shape mismatch (1): quant_conv.weight' in msg


def test_unsupported_config_rejected():
  with pytest.raises(ValueError, match='act_fn'):
    vae.VAEConfig.from_diffusers({**TINY, 'act_fn': 'gelu'})


def test_sd_config_param_tree_matches_diffusers(tmp_path):
  # The real SD VAE config (stabilityai/sd-vae-ft-mse) shapes, without computing anything full size.
  sd_cfg = dict(_class_name='AutoencoderKL', block_out_channels=[128, 256, 512, 512],
                down_block_types=['DownEncoderBlock2D'] * 4, up_block_types=['UpDecoderBlock2D'] * 4,
                in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                norm_num_groups=32, sample_size=256, act_fn='silu')
  with torch.device('meta'):
    ref = diffusers.AutoencoderKL(**{k: v for k, v in sd_cfg.items() if k != '_class_name'})
  ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  cfg = vae.VAEConfig.from_diffusers(sd_cfg)
  assert cfg == vae.VAEConfig()
  abstract = nnx.eval_shape(lambda: vae.AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(abstract))
  ours = {vae_weights._flax_path_to_torch_key(p): v.get_value().shape for p, v in flat}
  assert set(ours) == set(ref_shapes)
  assert len(ours) == 248
  for k, shape in ours.items():
    np.testing.assert_equal(
        vae_weights._to_flax(k, np.empty(ref_shapes[k], np.float32), 'kernel' if len(shape) > 1 else 'x'
                     ).shape, shape, err_msg=k)
  def roundtrip(x):
    model = vae.AutoencoderKL(cfg, rngs=nnx.Rngs(0))
    mean, _ = model.encode(x)
    return mean, model.decode(mean)
  mean, image = jax.eval_shape(roundtrip, jax.ShapeDtypeStruct((1, 256, 256, 3), np.float32))
  assert mean.shape == (1, 32, 32, 4) and image.shape == (1, 256, 256, 3)


def test_online_encoding_in_training_loop(tmp_path, saved_tiny):
  """Image-folder data + config.vae.path: main's loop trains on VAE latents (x scaling factor)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  from ppflow_jax import loop  # pylint: disable=g-import-not-at-top
  _, directory = saved_tiny
  rng = np.random.default_rng(0)
  for c in ('a', 'b'):
    os.makedirs(tmp_path / 'images' / c)
    for i in range(4):
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
          tmp_path / 'images' / c / f'{i}.png')
  config = tiny_config(2, hw=16, channels=4)
  config.data.update(source='image_folder', path=str(tmp_path / 'images'), image_size=32)
  config.vae.path = directory
  config.train.update(steps=2, log_every=1)
  config.checkpoint.async_save = False
  assert loop.needs_online_encoding(config)
  trainer, state = loop.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert int(state.step) == 2
  encoder = loop.OnlineEncoder(config, trainer)
  images = rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
  batch = encoder(loop.global_batch({'x': images, 'y': np.zeros(8, np.int32)}, trainer), 0)
  mean, _ = vae_weights.load_diffusers_vae(directory).encode(images)
  assert batch['x'].shape == (8, 16, 16, 4)
  # A posterior sample times the scaling factor: centred on the scaled mean.
  np.testing.assert_allclose(np.mean(batch['x'] / config.vae.scaling_factor - mean), 0, atol=0.1)
