"""A PyTorch SiT and official-PPFlow-layout model, written for this project's import tests.

Independent of the JAX code: it follows the published architecture facts (SiT: adaLN-Zero DiT
blocks, Conv2d patch embedding, `[cos, sin]` timestep features, MAE sin-cos positions; official
PPFlow: space-to-depth coarse levels on a 2x2 conv, level embedding in the conditioning vector)
and produces state dicts with exactly the upstream parameter names and shapes, so the converter
can be checked against it and, later, against the real upstream code.

`levels=1` is SiT/DiT (`pos_embed` one tensor, no level embedding); `levels=2|3` is PPFlow
(`x_embedder.proj1/proj2`, `final_layer.linear1/linear2`, `level_embedder`, `pos_embed.{i}`).
Latents are NCHW as upstream.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# Space-to-depth (rows, cols) factor of each official PPFlow level, coarsest first.
LEVEL_FACTORS = {1: ((1, 1),), 2: ((2, 2), (1, 1)), 3: ((2, 2), (1, 2), (1, 1))}


def sincos_grid(dim: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """MAE 2-D sin-cos table (len(rows) * len(cols), dim), row-major; first half encodes columns."""
  def axis(d, pos):
    omega = 1.0 / 10000.0 ** (np.arange(d // 2, dtype=np.float64) * 2.0 / d)
    ang = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)
  c, r = np.meshgrid(cols.astype(np.float64), rows.astype(np.float64))
  return np.concatenate([axis(dim // 2, c), axis(dim // 2, r)], axis=1).astype(np.float32)


def space_to_depth(x: torch.Tensor, m: int, n: int) -> torch.Tensor:
  """(N, C, H, W) -> (N, C*m*n, H/m, W/n); channel c*m*n + a*n + b is offset (a, b) of a block."""
  b, c, h, w = x.shape
  x = x.reshape(b, c, h // m, m, w // n, n).permute(0, 1, 3, 5, 2, 4)
  return x.reshape(b, c * m * n, h // m, w // n)


def depth_to_space(x: torch.Tensor, m: int, n: int) -> torch.Tensor:
  """The inverse of `space_to_depth`."""
  b, cmn, h, w = x.shape
  c = cmn // (m * n)
  x = x.reshape(b, c, m, n, h, w).permute(0, 1, 4, 2, 5, 3)
  return x.reshape(b, c, h * m, w * n)


class TimestepEmbedder(nn.Module):

  def __init__(self, d: int, freq_dim: int = 256):
    super().__init__()
    self.freq_dim = freq_dim
    self.mlp = nn.Sequential(nn.Linear(freq_dim, d), nn.SiLU(), nn.Linear(d, d))

  def forward(self, t: torch.Tensor) -> torch.Tensor:
    half = self.freq_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    ang = t.float()[:, None] * freqs[None]
    return self.mlp(torch.cat([torch.cos(ang), torch.sin(ang)], dim=1))


class TableEmbedder(nn.Module):
  """Label (num_classes + 1 rows, last = null) or level (one row per level) table."""

  def __init__(self, rows: int, d: int):
    super().__init__()
    self.embedding_table = nn.Embedding(rows, d)

  def forward(self, ids: torch.Tensor) -> torch.Tensor:
    return self.embedding_table(ids)


class SelfAttention(nn.Module):

  def __init__(self, d: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(d, 3 * d)
    self.proj = nn.Linear(d, d)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, l, d = x.shape
    q, k, v = self.qkv(x).reshape(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v)  # torch's fused kernel, scale 1/sqrt(D)
    return self.proj(out.transpose(1, 2).reshape(b, l, d))


class FeedForward(nn.Module):

  def __init__(self, d: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(d, hidden)
    self.fc2 = nn.Linear(hidden, d)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(F.gelu(self.fc1(x), approximate='tanh'))


def _norm(x: torch.Tensor) -> torch.Tensor:
  return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class Block(nn.Module):

  def __init__(self, d: int, heads: int, mlp_ratio: float):
    super().__init__()
    self.attn = SelfAttention(d, heads)
    self.mlp = FeedForward(d, int(d * mlp_ratio))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

  def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    sa, ga, gate_a, sm, gm, gate_m = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
    x = x + gate_a * self.attn(_norm(x) * (1 + ga) + sa)
    return x + gate_m * self.mlp(_norm(x) * (1 + gm) + sm)


class PatchEmbedder(nn.Module):
  """`proj` (finest, SiT's conv) plus `proj1`, `proj2` for the coarse levels."""

  def __init__(self, channels: int, d: int, p: int, levels: int):
    super().__init__()
    self.proj = nn.Conv2d(channels, d, p, stride=p)
    for i, (m, n) in enumerate(LEVEL_FACTORS[levels][:-1]):
      self.add_module(f'proj{i + 1}', nn.Conv2d(channels * m * n, d, p, stride=p))

  def conv(self, level: int, levels: int) -> nn.Conv2d:
    return self.proj if level == levels - 1 else getattr(self, f'proj{level + 1}')


class FinalLayer(nn.Module):

  def __init__(self, d: int, p: int, out_channels: int, levels: int):
    super().__init__()
    self.linear = nn.Linear(d, p * p * out_channels)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
    for i, (m, n) in enumerate(LEVEL_FACTORS[levels][:-1]):
      self.add_module(f'linear{i + 1}', nn.Linear(d, p * p * out_channels * m * n))

  def linear_of(self, level: int, levels: int) -> nn.Linear:
    return self.linear if level == levels - 1 else getattr(self, f'linear{level + 1}')


class TorchPPF(nn.Module):
  """SiT (levels=1) or official-layout PPFlow (levels=2|3) velocity model."""

  def __init__(self, *, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
               hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
               mlp_ratio: float = 4.0, num_classes: int = 1000, learn_sigma: bool = True,
               levels: int = 1):
    super().__init__()
    self.levels, self.p, self.in_channels = levels, patch_size, in_channels
    self.learn_sigma = learn_sigma
    out_channels = 2 * in_channels if learn_sigma else in_channels
    d = hidden_size
    self.x_embedder = PatchEmbedder(in_channels, d, patch_size, levels)
    self.t_embedder = TimestepEmbedder(d)
    self.y_embedder = TableEmbedder(num_classes + 1, d)
    if levels > 1:
      self.level_embedder = TableEmbedder(levels, d)
    grid = input_size // patch_size
    tables = [sincos_grid(d, np.arange(0, grid, m), np.arange(0, grid, n))[None]
              for m, n in LEVEL_FACTORS[levels]]
    if levels == 1:
      self.pos_embed = nn.Parameter(torch.from_numpy(tables[0]), requires_grad=False)
    else:
      self.pos_embed = nn.ParameterList(
          [nn.Parameter(torch.from_numpy(t), requires_grad=False) for t in tables])
    self.blocks = nn.ModuleList([Block(d, num_heads, mlp_ratio) for _ in range(depth)])
    self.final_layer = FinalLayer(d, patch_size, out_channels, levels)

  def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
              level: int) -> torch.Tensor:
    """x: (N, C, H, W); t: (N,) in [0, 1]; y: (N,) labels; level: 0 = coarsest -> (N, C, H, W)."""
    m, n = LEVEL_FACTORS[self.levels][level]
    h = self.x_embedder.conv(level, self.levels)(space_to_depth(x, m, n))
    rows, cols = h.shape[-2:]
    h = h.flatten(2).transpose(1, 2)
    h = h + (self.pos_embed if self.levels == 1 else self.pos_embed[level])
    c = self.t_embedder(t) + self.y_embedder(y)
    if self.levels > 1:
      c = c + self.level_embedder(torch.full_like(y, level))
    for block in self.blocks:
      h = block(h, c)
    shift, scale = self.final_layer.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
    h = self.final_layer.linear_of(level, self.levels)(_norm(h) * (1 + scale) + shift)
    p = self.p
    h = h.reshape(h.shape[0], rows, cols, p, p, -1)
    h = torch.einsum('nhwpqc->nchpwq', h).reshape(h.shape[0], -1, rows * p, cols * p)
    if self.learn_sigma:
      h = h[:, :h.shape[1] // 2]
    return depth_to_space(h, m, n)


def ppf_state_from_sit(sit_state: dict[str, torch.Tensor], ppf: TorchPPF) -> dict:
  """The official SiT -> PPFlow init (repeat_interleave over space-to-depth channels) on `ppf`."""
  state = {k: v.clone() for k, v in ppf.state_dict().items()}
  for k, v in sit_state.items():
    if k != 'pos_embed':
      state[k] = v.clone()
  w, b = sit_state['x_embedder.proj.weight'], sit_state['x_embedder.proj.bias']
  lw, lb = sit_state['final_layer.linear.weight'], sit_state['final_layer.linear.bias']
  for i, (m, n) in enumerate(LEVEL_FACTORS[ppf.levels][:-1]):
    state[f'x_embedder.proj{i + 1}.weight'] = torch.repeat_interleave(w / (m * n), m * n, dim=1)
    state[f'x_embedder.proj{i + 1}.bias'] = b.clone()
    state[f'final_layer.linear{i + 1}.weight'] = torch.repeat_interleave(lw, m * n, dim=0)
    state[f'final_layer.linear{i + 1}.bias'] = torch.repeat_interleave(lb, m * n, dim=0)
  return state
