"""Key, shape and layout mapping from SiT/DiT and official PPFlow state dicts to `PPFModel` params.

Both upstream models share SiT's names: `x_embedder.proj` (Conv2d k = s = p),
`t_embedder.mlp.{0,2}`, `y_embedder.embedding_table`, `blocks.N.{attn.qkv, attn.proj, mlp.fc1,
mlp.fc2, adaLN_modulation.1}`, `final_layer.{linear, adaLN_modulation.1}`, the fixed `pos_embed`.
The official PPFlow adds, per coarse level (index 0 = coarsest), `x_embedder.proj{1,2}` and
`final_layer.linear{1,2}` that work on a space-to-depth view of the latent, a level embedding
`level_embedder.embedding_table` and `pos_embed.{0,1,2}`.

Space-to-depth with factors (m, n) (m = rows, n = cols; official: (2, 2) for the 4x4 level, (1, 2)
for the 2-row x 4-col level) turns latent channel c at offset (a, b) of each m x n block into
channel `c*m*n + a*n + b`; the p x p conv then sees, at kernel position (i, j), latent offset
`(i*m + a, j*n + b)` of a (p*m) x (p*n) patch. The final linears emit the same order
(`(i, j, c*m*n + a*n + b)`, channel block last). Our tokens are (row, col, channel) with channel
innermost, so both are a reshape + transpose.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import ml_collections
import numpy as np
from flax import nnx
from flax import traverse_util

from ppflow_jax import config_lib
from ppflow_jax.models import block_stack
from ppflow_jax.models import build_model

# Space-to-depth factors (rows, cols) of the official PPFlow levels, coarsest first.
OFFICIAL_FACTORS = {2: ((2, 2), (1, 1)), 3: ((2, 2), (1, 2), (1, 1))}
_PPF_MARKERS = ('x_embedder.proj1.', 'x_embedder.proj2.', 'final_layer.linear1.',
                'final_layer.linear2.', 'level_embedder.', 'pos_embed.')
POS_TOLERANCE = 1e-5
_COARSE_KEY = re.compile(r'(x_embedder\.proj|final_layer\.linear)\d')


class CheckpointMismatchError(ValueError):
  """A state dict that does not fit the model of the config (every problem listed)."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a state dict holds: SiT/DiT (one patch size) or official PPFlow (2 or 3 levels)."""
  kind: str                              # 'sit' | 'ppf'
  patches: tuple[tuple[int, int], ...]   # (rows, cols) per level, coarsest first

  @property
  def name(self) -> str:
    return 'a SiT/DiT' if self.kind == 'sit' else f'an official {len(self.patches)}-level PPFlow'


def detect_layout(state: dict[str, np.ndarray]) -> Layout:
  """Tells SiT/DiT (only `x_embedder.proj`) from official PPFlow (`proj1`, `level_embedder`...)."""
  w = state.get('x_embedder.proj.weight')
  if w is None or w.ndim != 4:
    raise ValueError('not a SiT/DiT/PPFlow state dict: it has no 4-D x_embedder.proj.weight '
                     f'(its first keys: {sorted(state)[:8]})')
  p = w.shape[-1]
  if not any(k.startswith(_PPF_MARKERS) for k in state):
    return Layout('sit', ((p, p),))
  rows = state.get('level_embedder.embedding_table.weight')
  three = (any(k.startswith(('x_embedder.proj2.', 'final_layer.linear2.', 'pos_embed.2'))
               for k in state) or (rows is not None and rows.shape[0] == 3))
  return Layout('ppf', tuple((p * a, p * b) for a, b in OFFICIAL_FACTORS[3 if three else 2]))


def stage_key(prefix: str, stage: int, num_stages: int) -> str:
  """Official name of a stage's layer: `x_embedder.proj` for the finest, `proj1` for stage 0, ..."""
  return prefix if stage == num_stages - 1 else f'{prefix}{stage + 1}'


# -- layout transforms (numpy; torch tensors arrive as arrays) -------------------------------------

def embed_kernel(w: np.ndarray, channels: int, factors: tuple[int, int]) -> np.ndarray:
  """Conv weight (d, C*m*n, p, q) over a space-to-depth input -> kernel (p*m * q*n * C, d).

  Output rows are ordered (row, col, channel) of the (p*m, q*n) patch; with m = n = 1 this is
  SiT's plain patch conv.
  """
  d, _, p, q = w.shape
  m, n = factors
  w = w.reshape(d, channels, m, n, p, q)                   # (d, c, a, b, i, j)
  return w.transpose(4, 2, 5, 3, 1, 0).reshape(p * m * q * n * channels, d)  # (i a)(j b) c, d


def unembed_kernel(w: np.ndarray, channels: int, patch: tuple[int, int],
                   factors: tuple[int, int]) -> np.ndarray:
  """Linear weight (p*q*C*m*n, d), outputs (i, j, c*m*n + a*n + b) -> kernel (d, p*m * q*n * C)."""
  return unembed_bias(w.T, channels, patch, factors)


def unembed_bias(b: np.ndarray, channels: int, patch: tuple[int, int],
                 factors: tuple[int, int]) -> np.ndarray:
  """(..., p*q*C*m*n) in space-to-depth output order -> (..., (i a)(j b) c) token order."""
  (p, q), (m, n) = patch, factors
  lead = b.shape[:-1]
  b = b.reshape(*lead, p, q, channels, m, n)
  k = len(lead)
  order = tuple(range(k)) + (k, k + 3, k + 1, k + 4, k + 2)  # i, a, j, b, c
  return b.transpose(order).reshape(*lead, p * m * q * n * channels)


# -- the mapping -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
  """Where one of our leaves comes from: torch key, its expected torch shape, the transform."""
  source: str
  torch_shape: tuple[int, ...]
  fn: Callable[[np.ndarray], np.ndarray]


def _rules(target: dict, model) -> dict[tuple, Rule]:
  """One Rule per leaf of the flattened target params (keys as in `flatten_dict`)."""
  rules = {}
  same = lambda w: w

  def linear(path: tuple, src: str) -> None:
    k, b = target[path + ('kernel',)], target[path + ('bias',)]
    rules[path + ('kernel',)] = Rule(f'{src}.weight', k.shape[::-1], lambda w: w.T)
    rules[path + ('bias',)] = Rule(f'{src}.bias', b.shape, same)

  linear(('t_embedder', 'mlp_in'), 't_embedder.mlp.0')
  linear(('t_embedder', 'mlp_out'), 't_embedder.mlp.2')
  for path, src in ((('y_embedder', 'embedding'), 'y_embedder.embedding_table.weight'),
                    (('level_embedder', 'embedding'), 'level_embedder.embedding_table.weight')):
    if path in target:
      rules[path] = Rule(src, target[path].shape, same)
  for i in sorted({p[1] for p in target if p[0] == 'blocks'}):
    for sub, src in ((('attn', 'qkv'), 'attn.qkv'), (('attn', 'proj'), 'attn.proj'),
                     (('mlp', 'fc1'), 'mlp.fc1'), (('mlp', 'fc2'), 'mlp.fc2'),
                     (('adaLN_modulation',), 'adaLN_modulation.1')):
      linear(('blocks', i) + sub, f'blocks.{i}.{src}')
  linear(('final_modulation', 'adaLN_modulation'), 'final_layer.adaLN_modulation.1')

  schedule, c_in, c_out = model.schedule, model.in_channels, model.out_channels
  d, fine = model.hidden_size, schedule.finest.patch
  for s, stage in enumerate(schedule.stages):
    f = (stage.patch[0] // fine[0], stage.patch[1] // fine[1])
    mn = f[0] * f[1]
    emb = stage_key('x_embedder.proj', s, len(schedule))
    rules[('x_embedders', s, 'kernel')] = Rule(
        f'{emb}.weight', (d, c_in * mn) + fine, lambda w, f=f: embed_kernel(w, c_in, f))
    rules[('x_embedders', s, 'bias')] = Rule(f'{emb}.bias', (d,), same)
    out = stage_key('final_layer.linear', s, len(schedule))
    n_out = fine[0] * fine[1] * c_out * mn
    rules[('final_linears', s, 'kernel')] = Rule(
        f'{out}.weight', (n_out, d), lambda w, f=f: unembed_kernel(w, c_out, fine, f))
    rules[('final_linears', s, 'bias')] = Rule(
        f'{out}.bias', (n_out,), lambda b, f=f: unembed_bias(b, c_out, fine, f))
  unmapped = sorted(set(target) - set(rules), key=str)
  if unmapped:  # the model grew a parameter this importer does not know: never leave it random.
    raise NotImplementedError(f'convert/sit.py has no source for model parameters {unmapped}')
  return rules


def _pos_keys(layout: Layout, num_stages: int) -> dict[int, str]:
  if layout.kind == 'sit':
    return {num_stages - 1: 'pos_embed'}
  return {s: f'pos_embed.{s}' for s in range(num_stages)}


def abstract_model(config: ml_collections.ConfigDict):
  """The PPFModel of `config` with ShapeDtypeStruct leaves (no memory, no init cost)."""
  if config.model.variant != 'ppf':
    raise ValueError(f'config.model.variant={config.model.variant!r}: SiT/DiT/PPFlow weights '
                     "import into the 'ppf' model only")
  return nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))


def _hints(state: dict, layout: Layout, config: ml_collections.ConfigDict, missing: list,
           unexpected: list) -> list[str]:
  """Likely causes, from what the checkpoint says about itself."""
  m, hints = config.model, []
  if layout.kind == 'sit' and any(_COARSE_KEY.match(k) for k in missing):
    hints.append('this is a SiT/DiT checkpoint with one patch size: start a multi-stage PPF from '
                 'it with init_from_sit() (CLI: --init_from_sit), which builds the coarse stages')
  depth = len({k.split('.')[1] for k in state if k.startswith('blocks.')})
  hidden = state['t_embedder.mlp.2.weight'].shape[0] if 't_embedder.mlp.2.weight' in state else 0
  if hidden and (depth, hidden) != (m.depth, m.hidden_size):
    fix = f'--config.model.depth={depth} --config.model.hidden_size={hidden}'
    for name, (d, h, heads) in config_lib.MODEL_SIZES.items():
      if (d, h) == (depth, hidden):
        fix = f'{fix} --config.model.num_heads={heads} (the {name} size)'
    hints.append(f'the checkpoint has depth {depth}, hidden size {hidden}; the config has '
                 f'{m.depth}, {m.hidden_size}: pass {fix}')
  table = state.get('y_embedder.embedding_table.weight')
  if table is not None and table.shape[0] != m.num_classes + 1:
    hints.append(f'the label table has {table.shape[0]} rows (classes + null): set '
                 f'config.model.num_classes={table.shape[0] - 1}')
  if 'level_embedder.embedding_table.weight' in unexpected and not m.level_embedding:
    hints.append('the checkpoint has a level embedding: set config.model.level_embedding=True')
  return hints


def _sigma_hint(key: str, got: tuple, want: tuple) -> str:
  if key.startswith('final_layer.linear') and key.endswith('.weight') and got[1:] == want[1:]:
    if got[0] == 2 * want[0]:
      return ' — set config.model.learn_sigma=True'
    if 2 * got[0] == want[0]:
      return ' — set config.model.learn_sigma=False'
  return ''


def convert_state_dict(state: dict[str, np.ndarray], config: ml_collections.ConfigDict, *,
                       source: str = 'checkpoint') -> dict:
  """Torch-named arrays -> pure params dict of `PPFModel(config)` (numpy, config.model.param_dtype).

  Raises CheckpointMismatchError listing every missing, unexpected and mismatched key at once,
  and ValueError when an official PPFlow file's stage patches differ from config.schedule.
  """
  layout = detect_layout(state)
  model = abstract_model(block_stack.with_layout(config, False))  # torch keys are per block
  schedule = model.schedule
  ours = tuple(s.patch for s in schedule.stages)
  if layout.kind == 'ppf' and layout.patches != ours:
    raise ValueError(
        f'{source} is {layout.name} checkpoint with stage patches {list(layout.patches)} '
        f'(rows, cols; coarsest first), but config.schedule.patch_sizes={list(ours)}: use a config '
        f'with the same stages (configs/ppf_xl_{len(layout.patches)}.py for PPF-XL-'
        f'{len(layout.patches)})')
  target = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
  rules = _rules(target, model)

  params, missing, mismatched = {}, [], []
  for path, rule in rules.items():
    w = state.get(rule.source)
    if w is None:
      missing.append(rule.source)
    elif tuple(w.shape) != rule.torch_shape:
      mismatched.append(f'{rule.source}: checkpoint {tuple(w.shape)} vs model {rule.torch_shape}'
                        + _sigma_hint(rule.source, tuple(w.shape), rule.torch_shape))
    else:
      params[path] = np.asarray(rule.fn(w), dtype=target[path].dtype)

  pos_keys = _pos_keys(layout, len(schedule))
  for s, key in pos_keys.items():
    if key not in state:
      continue  # a fixed buffer: nothing to load, nothing to check.
    want = np.asarray(model.pos_embed(s))[None]
    got = state[key]
    if got.shape != want.shape:
      mismatched.append(f'{key}: checkpoint {tuple(got.shape)} vs model {want.shape} — a '
                        'different latent size or stage grid: set config.latent.height/width '
                        'to match')
    elif (err := float(np.abs(got - want).max())) > POS_TOLERANCE:
      mismatched.append(f'{key}: values differ from our fixed 2-D sin-cos embedding of stage {s} '
                        f'by up to {err:.3g} (a different grid or layout); only SiT/MAE sin-cos '
                        'positional embeddings can be imported')
  used = {r.source for r in rules.values()} | set(pos_keys.values())
  unexpected = sorted(k for k in state if k not in used)
  if missing or mismatched or unexpected:
    lines = [f'{source} is {layout.name} checkpoint that does not fit the model of this config '
             f'(stages {list(ours)}, depth {config.model.depth}, hidden '
             f'{config.model.hidden_size}, learn_sigma={config.model.learn_sigma}):']
    lines += [f'  hint: {h}' for h in _hints(state, layout, config, missing, unexpected)]
    for title, keys in (('missing', missing), ('unexpected', unexpected),
                        ('shape/value mismatch', mismatched)):
      if keys:
        lines.append(f'  {title} ({len(keys)}):')
        lines += [f'    {k}' for k in keys]
    raise CheckpointMismatchError('\n'.join(lines))
  return block_stack.to_layout(traverse_util.unflatten_dict(params), config.model.scan_blocks)
