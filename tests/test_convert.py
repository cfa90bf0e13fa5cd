"""Tests of ppflow_jax.convert: parity with a PyTorch SiT / official-PPFlow-layout model, the
SiT -> PPF initialisation identities, and refusal of unsafe or mismatched files."""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import ROOT
from conftest import tiny_config
from flax import nnx
from flax import traverse_util
from safetensors.torch import save_file

from ppflow_jax import config_lib
from ppflow_jax import convert
from ppflow_jax.convert import sit as sit_lib
from ppflow_jax.models import block_stack
from ppflow_jax.models import ppf
from third_party.torch_ref import TorchPPF
from third_party.torch_ref import ppf_state_from_sit

HW, C = 16, 2
TOL = dict(rtol=1e-5, atol=1e-5)


def torch_model(levels: int, learn_sigma: bool = True, seed: int = 0) -> TorchPPF:
  """A tiny reference model with every weight random, the zero-initialised adaLN-Zero and final
  layers included (else half the mapping would be tested against zeros); pos_embed stays fixed."""
  torch.manual_seed(seed)
  m = TorchPPF(input_size=HW, patch_size=2, in_channels=C, hidden_size=32, depth=2, num_heads=2,
               num_classes=5, learn_sigma=learn_sigma, levels=levels)
  with torch.no_grad():
    for name, p in m.named_parameters():
      if not name.startswith('pos_embed'):
        p.normal_(0.0, 1.0 / np.sqrt(np.prod(p.shape[1:])) if p.ndim > 1 else 0.1)
  return m.eval()


def save(state: dict, path) -> str:
  path = str(path)
  if path.endswith('.safetensors'):
    save_file({k: v.contiguous() for k, v in state.items()}, path)
  else:
    torch.save(state, path)
  return path


def inputs(seed: int = 0):
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(3, C, HW, HW, generator=g)
  return x, torch.rand(3, generator=g), torch.tensor([0, 5, 3])  # 5 = the null label


def to_jax(x, t, y):
  return (jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()),
          jnp.asarray(y.numpy()))


def flat(params: dict) -> dict:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def merge(config, params) -> nnx.Module:
  graphdef, _ = nnx.split(sit_lib.abstract_model(config))
  return nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))


# -- parity with the PyTorch reference ------------------------------------------------------------

@pytest.mark.parametrize('levels', [1, 2, 3])
@pytest.mark.parametrize('learn_sigma', [True, False])
def test_parity_every_stage(tmp_path, levels, learn_sigma):
  ref = torch_model(levels, learn_sigma)
  model = convert.load_model(save(ref.state_dict(), tmp_path / 'm.pt'),
                             tiny_config(levels, learn_sigma=learn_sigma))
  x, t, y = inputs()
  for stage in range(levels):
    with torch.no_grad():
      want = ref(x, t, y, stage).numpy()
    got = np.asarray(model(*to_jax(x, t, y), stage)).transpose(0, 3, 1, 2)
    assert np.abs(want).max() > 1.0  # a live output, not a zero-initialised one
    np.testing.assert_allclose(got, want, **TOL, err_msg=f'{levels} levels, stage {stage}')


def test_parity_and_init_in_the_scanned_layout(tmp_path, sit_file):
  """Importers, init_from_sit and converted-params dirs give the scanned layout when asked, with
  the same numbers (stacked) and the same outputs."""
  ref = torch_model(2)
  path = save(ref.state_dict(), tmp_path / 'm.pt')
  unrolled, scanned = tiny_config(2), tiny_config(2)
  scanned.model.scan_blocks = True
  model = convert.load_model(path, scanned)
  x, t, y = inputs()
  for stage in range(2):
    with torch.no_grad():
      want = ref(x, t, y, stage).numpy()
    got = np.asarray(model(*to_jax(x, t, y), stage)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, **TOL, err_msg=f'scanned, stage {stage}')
  stacked = lambda p: flat(block_stack.stack_params(p))
  for got, want in ((convert.load_torch_checkpoint(path, scanned),
                     convert.load_torch_checkpoint(path, unrolled)),
                    (convert.init_from_sit(sit_file, scanned), convert.init_from_sit(sit_file, unrolled))):
    got, want = flat(got), stacked(want)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
  # A converted-params dir written in one layout restores in the other.
  convert.save_params(convert.load_torch_checkpoint(path, unrolled), str(tmp_path / 'w'))
  restored = flat(convert.restore_params(str(tmp_path / 'w'), scanned))
  for k, v in stacked(convert.load_torch_checkpoint(path, unrolled)).items():
    np.testing.assert_array_equal(restored[k], v, err_msg=str(k))


def test_safetensors_and_containers_give_the_same_params(tmp_path):
  state = torch_model(3).state_dict()
  config = tiny_config(3)
  base = flat(convert.load_torch_checkpoint(save(state, tmp_path / 'a.pt'), config))
  other = {k: torch.zeros_like(v) for k, v in state.items()}
  container = {'model': other, 'ema': {f'module.{k}': v for k, v in state.items()},
               'args': argparse.Namespace(model='PPFlow_XL_3')}  # as SiT/DiT train.py saves
  for path in (save(state, tmp_path / 'a.safetensors'), save(container, tmp_path / 'b.pt')):
    got = flat(convert.load_torch_checkpoint(path, config))
    assert got.keys() == base.keys()
    for k in base:
      np.testing.assert_array_equal(got[k], base[k], err_msg=f'{path}: {k}')


# -- safety and errors -----------------------------------------------------------------------------

class _Payload:

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


def test_malicious_pickle_is_refused_without_running(tmp_path):
  live = tmp_path / 'live'
  pickle.loads(pickle.dumps(_Payload(str(live))))  # control: a plain unpickle runs the payload
  assert live.exists()
  marker = tmp_path / 'pwned'
  via_torch = str(tmp_path / 'evil.pt')
  torch.save({'x_embedder.proj.weight': torch.zeros(4, 2, 2, 2), 'e': _Payload(str(marker))},
             via_torch)
  raw = str(tmp_path / 'evil.pth')
  with open(raw, 'wb') as f:
    pickle.dump({'w': _Payload(str(marker))}, f, protocol=2)
  for path in (via_torch, raw):
    with pytest.raises(convert.UnsafeCheckpointError) as e:
      convert.load_torch_checkpoint(path, tiny_config(1))
    assert path in str(e.value) and 'weights_only=True' in str(e.value)
    assert 'system' in str(e.value)  # names what it refused
  assert not marker.exists()


def test_mismatch_lists_every_problem(tmp_path):
  state = torch_model(1, learn_sigma=True).state_dict()
  del state['blocks.1.mlp.fc2.bias']
  state['extra.weight'] = torch.zeros(3)
  path = save(state, tmp_path / 'sit.pt')
  with pytest.raises(convert.CheckpointMismatchError) as e:
    convert.load_torch_checkpoint(path, tiny_config(1, learn_sigma=False))
  msg = str(e.value)
  for part in ('missing (1)', 'blocks.1.mlp.fc2.bias', 'unexpected (1)', 'extra.weight',
               'final_layer.linear.weight: checkpoint (16, 32) vs model (8, 32) — set '
               'config.model.learn_sigma=True', 'final_layer.linear.bias: checkpoint (16,)'):
    assert part in msg, msg
  # A SiT file for a 2-stage config: the coarse-stage keys are missing, and the hint says why.
  with pytest.raises(convert.CheckpointMismatchError) as e:
    convert.load_torch_checkpoint(path, tiny_config(2))
  for part in ('x_embedder.proj1.weight', 'final_layer.linear1.bias',
               'level_embedder.embedding_table.weight', 'init_from_sit'):
    assert part in str(e.value), str(e.value)


def test_positional_embeddings_and_stage_patches_are_checked(tmp_path):
  state = torch_model(3).state_dict()
  bad = dict(state, **{'pos_embed.1': state['pos_embed.1'] + 1e-3})
  with pytest.raises(convert.CheckpointMismatchError, match=r'pos_embed\.1: values differ'):
    convert.load_torch_checkpoint(save(bad, tmp_path / 'bad.pt'), tiny_config(3))
  path = save(state, tmp_path / 'ppf3.pt')
  with pytest.raises(convert.CheckpointMismatchError, match=r'pos_embed\.2: checkpoint \(1, 64'):
    convert.load_torch_checkpoint(path, tiny_config(3, hw=32))
  # The official middle level is 2 rows x 4 cols; a 4 x 2 config must not silently transpose it.
  with pytest.raises(ValueError, match=r'patch_sizes=\[\(4, 4\), \(4, 2\), \(2, 2\)\]'):
    convert.load_torch_checkpoint(path, tiny_config(3, patch_sizes=((4, 4), (4, 2), (2, 2))))


# -- initialisation from SiT ----------------------------------------------------------------------

def forward(model, x, t, y, stage: int, pos, c_shift=0.0):
  """`model(x, t, y, stage)` with a chosen positional embedding and a shift of the condition c."""
  tokens = model.x_embedders[stage](ppf.patchify(x, model.schedule.stages[stage].patch)) + pos
  c = model.condition(t, y, stage) + c_shift
  return model.unembed(model.run_blocks(tokens, c), c, stage)


@pytest.fixture(scope='module')
def sit_file(tmp_path_factory):
  return save(torch_model(1, seed=1).state_dict(), tmp_path_factory.mktemp('sit') / 'sit.pt')


def test_init_finest_stage_is_sit(sit_file):
  sit = convert.load_model(sit_file, tiny_config(1))
  x, t, y = to_jax(*inputs())
  want = np.asarray(sit(x, t, y, 0))
  # Without a level embedding the finest stage is SiT, bit for bit.
  config = tiny_config(3)
  config.model.level_embedding = False
  model = merge(config, convert.init_from_sit(sit_file, config))
  np.testing.assert_array_equal(np.asarray(model(x, t, y, 2)), want)
  # With it, the finest stage is SiT whose conditioning is shifted by the fresh level row.
  config = tiny_config(3)
  params = convert.init_from_sit(sit_file, config, seed=3)
  level = params['level_embedder']['embedding']
  assert 0.01 < level.std() < 0.04  # fresh N(0, 0.02)
  model = merge(config, params)
  got = np.asarray(model(x, t, y, 2))
  np.testing.assert_allclose(got, np.asarray(forward(sit, x, t, y, 0, sit.pos_embed(0),
                                                     jnp.asarray(level[2]))), **TOL)
  assert np.abs(got - want).max() > 1e-3  # ... which is not SiT itself


@pytest.mark.parametrize('num_stages,patches,stage', [
    (2, None, 0),                           # 4x4 over SiT's 2x2: SiT on the 2x2-pooled latent
    (3, None, 1),                           # the official 2 rows x 4 cols stage
    (3, ((4, 4), (4, 2), (2, 2)), 1),       # rectangular the other way
    (4, None, 0),                           # 4 x 8
])
def test_init_coarse_stage_is_sit_on_pooled_latent(sit_file, num_stages, patches, stage):
  config = tiny_config(num_stages, patch_sizes=patches)
  model = merge(config, convert.init_from_sit(sit_file, config))
  ph, pw = model.schedule.stages[stage].patch
  m, n = ph // 2, pw // 2
  # SiT at the pooled resolution (its params do not depend on the latent size).
  small = tiny_config(1)
  small.latent.update(height=HW // m, width=HW // n)
  sit = merge(small, convert.load_torch_checkpoint(sit_file, tiny_config(1)))

  x, t, y = to_jax(*inputs(seed=2))
  pooled = x.reshape(3, HW // m, m, HW // n, n, C).mean((2, 4))
  up = lambda v: np.repeat(np.repeat(np.asarray(v), m, axis=1), n, axis=2)
  level = model.level_embedder.embedding[...][stage]
  got = np.asarray(model(x, t, y, stage))
  # Exact: SiT with this stage's positional embedding and the level row added to c.
  np.testing.assert_allclose(
      got, up(forward(sit, pooled, t, y, 0, model.pos_embed(stage), level)), **TOL)
  # The positional and level embeddings are the only difference from plain SiT on the pool.
  assert np.abs(got - up(sit(pooled, t, y, 0))).max() > 1e-3
  assert np.abs(got - up(forward(sit, pooled, t, y, 0, model.pos_embed(stage)))).max() > 1e-3


def test_init_matches_official_repeat_interleave(tmp_path, sit_file):
  config = tiny_config(3)
  official = ppf_state_from_sit(torch.load(sit_file, weights_only=True), torch_model(3, seed=5))
  want = flat(convert.load_torch_checkpoint(save(official, tmp_path / 'ppf.pt'), config))
  got = flat(convert.init_from_sit(sit_file, config))
  assert got.keys() == want.keys()
  for k in want:
    if k[0] != 'level_embedder':  # fresh random in both
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=0, err_msg=str(k))


def test_params_for_init_and_cli(tmp_path, sit_file):
  config = tiny_config(2)
  expect = flat(convert.init_from_sit(sit_file, config))
  assert all(np.array_equal(v, expect[k])
             for k, v in flat(convert.params_for_init(sit_file, config)).items())
  ppf_file = save(torch_model(3).state_dict(), tmp_path / 'ppf3.safetensors')
  direct = flat(convert.load_torch_checkpoint(ppf_file, tiny_config(3)))
  assert all(np.array_equal(v, direct[k])
             for k, v in flat(convert.params_for_init(ppf_file, tiny_config(3))).items())

  # The CLI on the runlocal recipe (S-sized, 32x32x1 latent, 2 stages, 10 classes).
  torch.manual_seed(0)
  sit = TorchPPF(input_size=32, patch_size=2, in_channels=1, hidden_size=96, depth=2,
                 num_heads=4, num_classes=10, levels=1)
  path = save(sit.state_dict(), tmp_path / 'sit_local.safetensors')
  workdir = str(tmp_path / 'work')
  cmd = [sys.executable, '-m', 'ppflow_jax.convert', '--config=configs/ppf_b_2.py:runlocal',
         f'--torch_checkpoint={path}', f'--workdir={workdir}', '--init_from_sit']
  run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert run.returncode == 0, run.stderr[-3000:]
  from configs import ppf_b_2  # pylint: disable=g-import-not-at-top
  local = config_lib.resolve(ppf_b_2.get_config('runlocal'))
  restored = flat(convert.params_for_init(workdir, local))
  expect = flat(convert.init_from_sit(path, local))
  assert restored.keys() == expect.keys()
  for k in expect:
    np.testing.assert_array_equal(restored[k], expect[k], err_msg=str(k))
