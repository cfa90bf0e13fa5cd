"""MPDiT (Dao & Metaxas): a global-to-local DiT and its forward multiply-add count.

The first N - k blocks run on large-patch tokens (4x4 by default: 64 tokens on a 32x32 latent),
an upsample block expands them to small-patch tokens (the schedule's finest patch, 2x2: 256
tokens), and the last k blocks refine those. Following the paper and its released code:
- Class conditioning is m learned prefix tokens per class (one (num_classes + 1, m*d) table,
  the last row the CFG null class), attended by every block and dropped before the output.
- Time conditioning is an FNO embedding (grid `linspace(-1, 1, 32) + t`, lift 1 -> 32, three
  spectral + pointwise 1-D conv layers over 16 modes, GELU between, mean-pool, linear to d) and
  one *shared* adaLN: a single Linear(d, 6d) whose (shift, scale, gate) x 2 modulate every block;
  the final layer uses its MLP shift/scale. Blocks themselves have no adaLN parameters.
- Upsample block: Linear(d, f_r*f_c*d) on image tokens, pixel-shuffle to the small-patch grid
  (channel order (d, row, col)), tanh-GELU, concatenate the class tokens, LayerNorm, then one
  Linear(d, d) over class *and* image tokens (re-aligning them), then add the skip: the
  small-patch embedding of the input through its own Linear(d, d), and the fine sin-cos
  positions.

Time direction: MPDiT writes x_t = (1 - t) x + t n (t = 1 noise). Our t = 0 is noise, so the FNO
sees MPDiT's time `1 - t` (same time features as the released model); the network outputs our
velocity x1 - x0 (MPDiT regresses n - x = -(x1 - x0), learnable either way when training here).

The model has `__call__(x, t, y, stage)` like PPFModel (stage must be 0: MPDiT has one
schedule stage, the small patch) and no piecewise embed/run_blocks API: packing.bucketed_forward
calls it whole, per bucket.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ppflow_jax import stages as stages_lib
from ppflow_jax.models import dit
from ppflow_jax.models.ppf import patchify, set_io_fields, unpatchify

FNO_GRID = 32      # time-signal grid points (paper: linspace(-1, 1, 32))
FNO_WIDTH = 32     # lifted channels
FNO_MODES = 16     # Fourier modes kept
FNO_LAYERS = 3


def coarse_patch(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The large patch of the first N - k blocks: config.model.mpdit_coarse_patch, default 2x fine."""
  fh, fw = stages_lib.from_config(config).finest.patch
  patch = tuple(config.model.mpdit_coarse_patch) or (2 * fh, 2 * fw)
  return int(patch[0]), int(patch[1])


def _check_config(config: ml_collections.ConfigDict) -> tuple[stages_lib.Schedule, tuple, int]:
  schedule = stages_lib.from_config(config)
  if len(schedule) != 1:
    raise ValueError(
        f'MPDiT uses one schedule stage (its output patch), got {len(schedule)} stages; set '
        'config.schedule.patch_sizes=((2, 2),), boundaries=(), cfg_scales=(s,) (configs/mpdit_b.py)')
  (fh, fw), (ch, cw) = schedule.finest.patch, coarse_patch(config)
  h, w = schedule.latent_hw
  if ch % fh or cw % fw or ch * cw == fh * fw or h % ch or w % cw:
    raise ValueError(f'config.model.mpdit_coarse_patch={(ch, cw)} must be a larger multiple of '
                     f'the small patch {(fh, fw)} that divides the {h}x{w} latent')
  m = config.model
  if not 0 < m.mpdit_fine_blocks <= m.depth:
    raise ValueError(f'config.model.mpdit_fine_blocks={m.mpdit_fine_blocks} must be in '
                     f'[1, depth={m.depth}]')
  if m.mpdit_class_tokens < 1:
    raise ValueError(f'config.model.mpdit_class_tokens={m.mpdit_class_tokens} must be >= 1')
  return schedule, (ch, cw), m.mpdit_fine_blocks


class SpectralConv1d(nnx.Module):
  """(B, L, W) -> (B, L, W): keeps the first `modes` rFFT modes, mixes channels per mode."""

  def __init__(self, width: int, modes: int, *, param_dtype, rngs: nnx.Rngs):
    self.modes = modes
    init = nnx.initializers.normal(1.0)  # torch.randn, as the released code
    self.weights_real = nnx.Param(init(rngs.params(), (width, width, modes), param_dtype))
    self.weights_imag = nnx.Param(init(rngs.params(), (width, width, modes), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    length = x.shape[1]
    if self.modes > length // 2 + 1:
      raise ValueError(f'{self.modes} Fourier modes need a grid of >= {2 * self.modes - 2} points')
    xf = jnp.fft.rfft(x.astype(jnp.float32), axis=1)[:, :self.modes]          # (B, M, W)
    w = jax.lax.complex(self.weights_real[...].astype(jnp.float32),
                        self.weights_imag[...].astype(jnp.float32))          # (W_in, W_out, M)
    yf = jnp.einsum('bmi,iom->bmo', xf, w)
    yf = jnp.pad(yf, ((0, 0), (0, length // 2 + 1 - self.modes), (0, 0)))
    return jnp.fft.irfft(yf, n=length, axis=1).astype(x.dtype)


class FNOTimeEmbedder(nnx.Module):
  """t: (B,) MPDiT time (1 = noise) -> (B, d) via a 1-D Fourier neural operator on a time grid."""

  def __init__(self, d: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # torch Conv1d(k=1) default init: U(+-1/sqrt(fan_in)) for kernel and bias.
    bound = 1.0 / np.sqrt(FNO_WIDTH)
    conv_init = nnx.initializers.uniform(2 * bound)
    shifted = lambda key, shape, dt: conv_init(key, shape, dt) - bound
    self.fc0 = nnx.Linear(1, FNO_WIDTH, kernel_init=dit.xavier, bias_init=dit.zeros, **kw)
    self.spectral = nnx.List([SpectralConv1d(FNO_WIDTH, FNO_MODES, param_dtype=param_dtype,
                                             rngs=rngs) for _ in range(FNO_LAYERS)])
    self.pointwise = nnx.List([nnx.Linear(FNO_WIDTH, FNO_WIDTH, kernel_init=shifted,
                                          bias_init=shifted, **kw) for _ in range(FNO_LAYERS)])
    self.fc1 = nnx.Linear(FNO_WIDTH, d, kernel_init=dit.logical(dit.xavier, (None, 'embed')),
                          bias_init=dit.zeros, **kw)

  def __call__(self, t: jax.Array) -> jax.Array:
    grid = jnp.linspace(-1.0, 1.0, FNO_GRID, dtype=jnp.float32)[None] + t.astype(jnp.float32)[:, None]
    x = self.fc0(grid[..., None])                                            # (B, G, W)
    for i, (spectral, pointwise) in enumerate(zip(self.spectral, self.pointwise)):
      x = spectral(x) + pointwise(x)
      if i < FNO_LAYERS - 1:
        x = jax.nn.gelu(x, approximate=False)
    return self.fc1(x.mean(axis=1))


class Block(nnx.Module):
  """A DiT block without its own adaLN: modulated by the shared (shift, scale, gate) x 2."""

  def __init__(self, d: int, num_heads: int, mlp_ratio: float, *, impl: str, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn = dit.Attention(d, num_heads, impl=impl, **kw)
    self.mlp = dit.MLP(d, int(d * mlp_ratio), **kw)

  def __call__(self, x: jax.Array, mod: tuple[jax.Array, ...]) -> jax.Array:
    """x: (B, L, d); mod: six (B, 1, d) arrays -> (B, L, d)."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
    x = x + gate_msa * self.attn(dit.modulate(dit.layer_norm(x), shift_msa, scale_msa), None)
    return x + gate_mlp * self.mlp(dit.modulate(dit.layer_norm(x), shift_mlp, scale_mlp))


class Upsample(nnx.Module):
  """(B, m + L_coarse, d) -> (B, m + L_fine, d): the upsample block before the skip is added."""

  def __init__(self, d: int, factor: tuple[int, int], *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, bias_init=dit.zeros)
    self.factor = factor
    self.proj = nnx.Linear(d, factor[0] * factor[1] * d,
                           kernel_init=dit.logical(dit.xavier, ('embed', 'mlp')), **kw)
    self.refine = nnx.Linear(d, d, kernel_init=dit.logical(dit.xavier, ('embed', None)), **kw)

  def __call__(self, x: jax.Array, num_cls: int, coarse_grid: tuple[int, int]) -> jax.Array:
    cls_tokens, img = x[:, :num_cls], x[:, num_cls:]
    img = einops.rearrange(self.proj(img), 'b (h w) (d p q) -> b (h p w q) d',
                           h=coarse_grid[0], p=self.factor[0], q=self.factor[1])
    img = jax.nn.gelu(img, approximate=True)
    return self.refine(dit.layer_norm(jnp.concatenate([cls_tokens, img], axis=1)))


class MPDiT(nnx.Module):
  """Velocity network v(x_t, t, y): large-patch blocks, upsample, small-patch blocks."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = config.model
    self.schedule, self.coarse_patch, k = _check_config(config)
    self.fine_patch = self.schedule.finest.patch
    self.num_cls = m.mpdit_class_tokens
    d, kw, linear = set_io_fields(self, config, rngs)
    h, w = self.schedule.latent_hw
    (ch, cw), (fh, fw) = self.coarse_patch, self.fine_patch
    self.coarse_grid, self.fine_grid = (h // ch, w // cw), (h // fh, w // fw)

    self.x_embedder = nnx.Linear(ch * cw * self.in_channels, d,
                                 kernel_init=dit.logical(dit.xavier, (None, 'embed')), **linear)
    self.skip_embedder = nnx.Linear(fh * fw * self.in_channels, d,
                                    kernel_init=dit.logical(dit.xavier, (None, 'embed')), **linear)
    self.skip_linear = nnx.Linear(d, d, kernel_init=dit.logical(dit.xavier, ('embed', None)),
                                  **linear)
    self.t_embedder = FNOTimeEmbedder(d, **kw)
    self.y_embedder = nnx.Embed(m.num_classes + 1, self.num_cls * d, embedding_init=dit.logical(
        dit.normal02, ('vocab', None)), **kw)
    self.time_modulation = nnx.Linear(d, 6 * d, kernel_init=dit.logical(dit.zeros, ('embed', 'mlp')),
                                      **linear)
    block = lambda: Block(d, m.num_heads, m.mlp_ratio, impl=m.attention, **kw)
    self.coarse_blocks = nnx.List([block() for _ in range(m.depth - k)])
    self.upsample = Upsample(d, (ch // fh, cw // fw), **kw)
    self.fine_blocks = nnx.List([block() for _ in range(k)])
    self.final_linear = nnx.Linear(d, fh * fw * self.out_channels,
                                   kernel_init=dit.logical(dit.zeros, ('embed', None)), **linear)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, stage: int = 0) -> jax.Array:
    """x: (B, H, W, C); t: (B,) (0 = noise); y: (B,) int; stage: 0 -> velocity (B, H, W, C)."""
    if stage != 0:
      raise ValueError(f'MPDiT has a single schedule stage; got stage={stage}')
    b, d = x.shape[0], self.hidden_size
    x = x.astype(self.dtype)
    pos = lambda grid: jnp.asarray(dit.sincos_2d(d, *grid), self.dtype)
    tokens = self.x_embedder(patchify(x, self.coarse_patch)) + pos(self.coarse_grid)
    cls_tokens = self.y_embedder(y).reshape(b, self.num_cls, d)
    mod = jnp.split(self.time_modulation(nnx.silu(self.t_embedder(1.0 - t)))[:, None], 6, axis=-1)

    tokens = jnp.concatenate([cls_tokens, tokens], axis=1)
    for blk in self.coarse_blocks:
      tokens = blk(tokens, mod)
    tokens = self.upsample(tokens, self.num_cls, self.coarse_grid)
    skip = self.skip_linear(self.skip_embedder(patchify(x, self.fine_patch)))
    img = tokens[:, self.num_cls:] + skip + pos(self.fine_grid)
    tokens = jnp.concatenate([tokens[:, :self.num_cls], img], axis=1)
    for blk in self.fine_blocks:
      tokens = blk(tokens, mod)

    shift, scale = mod[3], mod[4]
    out = self.final_linear(dit.modulate(dit.layer_norm(tokens[:, self.num_cls:]), shift, scale))
    out = unpatchify(out, self.fine_patch, self.schedule.latent_hw)
    return out[..., :self.in_channels].astype(jnp.float32)


def mpdit_forward_flops(config: ml_collections.ConfigDict, attention: str = 'paper') -> float:
  """Multiply-adds of one MPDiT forward pass for one image (divide by 1e9 for the paper's GFLOPs):
  the sum of `forward_macs_terms`."""
  return float(sum(forward_macs_terms(config, attention).values()))


def forward_macs_terms(config: ml_collections.ConfigDict, attention: str = 'exact'
                       ) -> dict[str, int]:
  """Multiply-adds per term of one MPDiT forward pass for one image (flops.py sums them).

  Linear layers are counted at their real token counts (m class tokens included). Attention
  (QK^T and AV, 2 L^2 d per block):
  - 'exact': at each block's real length L (m + coarse or m + fine tokens).
  - 'paper': 2 N_f^2 d in *every* block with N_f the fine image-token count (256 at 256 px).
    This is the convention that reproduces every GFLOPs number of the MPDiT paper (Tables 1, 2,
    3, 4, 6: B 16.6, XL 59.3, k = 4/8, m = 1..32, DiT-B/XL dagger 24.3/125.5) to the printed
    digit; the real attention cost is lower (16.2 / 56.4 G for B / XL with 'exact').
  FNO spectral mixing, norms and elementwise ops are not counted (a few MFLOPs).
  """
  if attention not in ('paper', 'exact'):
    raise ValueError(f"attention={attention!r} must be 'paper' or 'exact'")
  schedule, (ch, cw), k = _check_config(config)
  mc, c = config.model, config.latent.channels
  d, n, m = mc.hidden_size, mc.depth, mc.mpdit_class_tokens
  (fh, fw), (h, w) = schedule.finest.patch, schedule.latent_hw
  n_coarse, n_fine = (h // ch) * (w // cw), (h // fh) * (w // fw)
  c_out = 2 * c if mc.learn_sigma else c
  hidden = int(d * mc.mlp_ratio)
  per_token = 4 * d * d + 2 * d * hidden                 # qkv, proj, fc1, fc2

  def attention_macs(length: int) -> int:
    return 2 * (n_fine if attention == 'paper' else length) ** 2 * d

  return dict(
      coarse_blocks=(n - k) * (per_token * (m + n_coarse) + attention_macs(m + n_coarse)),
      fine_blocks=k * (per_token * (m + n_fine) + attention_macs(m + n_fine)),
      patch_embed=n_coarse * ch * cw * c * d,                  # large-patch embedding
      skip_embed=n_fine * (fh * fw * c * d + d * d),           # skip embedding + its linear
      upsample=n_coarse * d * (ch // fh) * (cw // fw) * d,     # upsample projection
      upsample_refine=(m + n_fine) * d * d,                    # class + image tokens
      final_linear=n_fine * d * fh * fw * c_out,               # output projection
      adaln=6 * d * d,                                         # shared adaLN
      timestep_embed=FNO_GRID * (FNO_WIDTH + FNO_LAYERS * FNO_WIDTH ** 2) + FNO_WIDTH * d)
