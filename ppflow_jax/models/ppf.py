"""The PPFlow model: SiT's shared DiT blocks with one Patchify/Unpatchify projection per stage.

A stage's patch (ph, pw) turns the (H, W, C) latent into (H/ph)*(W/pw) tokens. Each stage has
its own input projection (ph*pw*C -> d), output projection (d -> ph*pw*C_out) and, with more
than one stage, a learned level-embedding row added to the conditioning vector
`c = t_emb + y_emb + level_emb`. Positional embeddings are the finest grid's fixed sin-cos
values taken at each coarse token's top-left fine position. A one-stage model is exactly SiT.

Token vectors are ordered (row-in-patch, col-in-patch, channel), channel innermost, as SiT's
unpatchify (`nhwpqc`); the importers rely on this order. The blocks run unrolled or scanned, with
optional remat (config.model.scan_blocks / remat, models/block_stack.py).
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ppflow_jax import stages as stages_lib
from ppflow_jax.models import block_stack
from ppflow_jax.models import dit
from ppflow_jax.models import lora


def patchify(x: jax.Array, patch: tuple[int, int]) -> jax.Array:
  """x: (B, H, W, C) -> (B, (H/ph)*(W/pw), ph*pw*C), tokens row-major."""
  return einops.rearrange(x, 'b (h p) (w q) c -> b (h w) (p q c)', p=patch[0], q=patch[1])


def unpatchify(tokens: jax.Array, patch: tuple[int, int], hw: tuple[int, int]) -> jax.Array:
  """tokens: (B, L, ph*pw*C) -> (B, H, W, C); the inverse of `patchify`."""
  ph, pw = patch
  return einops.rearrange(tokens, 'b (h w) (p q c) -> b (h p) (w q) c',
                          h=hw[0] // ph, p=ph, q=pw)


def set_io_fields(model: nnx.Module, config: ml_collections.ConfigDict,
                  rngs: nnx.Rngs) -> tuple[int, dict, dict]:
  """Sets the fields every velocity network has (classes, channels, width, dtype) on `model`;
  returns (width d, layer kwargs, kwargs of a zero-bias linear layer)."""
  m = config.model
  model.num_classes = m.num_classes
  model.in_channels = config.latent.channels
  model.out_channels = 2 * model.in_channels if m.learn_sigma else model.in_channels
  model.hidden_size = m.hidden_size
  model.dtype = jnp.dtype(m.dtype)
  kw = dict(dtype=model.dtype, param_dtype=jnp.dtype(m.param_dtype), rngs=rngs)
  return m.hidden_size, kw, dict(bias_init=dit.zeros, **kw)


class PPFModel(nnx.Module):
  """Velocity network v(x_t, t, y) whose tokenisation depends on the stage of t."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = config.model
    self.schedule = stages_lib.from_config(config)
    d, kw, linear = set_io_fields(self, config, rngs)

    self.t_embedder = dit.TimestepEmbedder(d, **kw)
    self.y_embedder = nnx.Embed(m.num_classes + 1, d, embedding_init=dit.logical(
        dit.normal02, ('vocab', 'embed')), **kw)
    num_stages = len(self.schedule)
    self.level_embedder = (
        nnx.Embed(num_stages, d, embedding_init=dit.logical(dit.normal02, (None, 'embed')), **kw)
        if num_stages > 1 and m.level_embedding else None)
    self.x_embedders = nnx.List([
        nnx.Linear(s.patch_area * self.in_channels, d,
                   kernel_init=dit.logical(dit.xavier, (None, 'embed')), **linear)
        for s in self.schedule.stages])
    blocks = [dit.DiTBlock(d, m.num_heads, m.mlp_ratio, impl=m.attention,
                           lora=lora.settings(config), **kw) for _ in range(m.depth)]
    self.lora = bool(m.lora_rank)
    self.blocks = block_stack.stack_modules(blocks) if m.scan_blocks else nnx.List(blocks)
    self.remat = m.remat
    self.final_modulation = dit.FinalModulation(d, **kw)
    self.final_linears = nnx.List([
        nnx.Linear(d, s.patch_area * self.out_channels,
                   kernel_init=dit.logical(dit.zeros, ('embed', None)), **linear)
        for s in self.schedule.stages])

  # -- the pieces, composed by __call__ here and by the packed trainer (packing.py) ------------

  def pos_embed(self, stage: int) -> jax.Array:
    """(L_stage, d): finest-grid sin-cos values at each token's top-left fine position."""
    fine_rows, fine_cols = self.schedule.token_grid(len(self.schedule) - 1)
    (ph, pw), (fh, fw) = self.schedule.stages[stage].patch, self.schedule.finest.patch
    grid = dit.sincos_2d(self.hidden_size, fine_rows, fine_cols).reshape(fine_rows, fine_cols, -1)
    return jnp.asarray(grid[::ph // fh, ::pw // fw].reshape(-1, self.hidden_size))

  def embed(self, x: jax.Array, stage: int) -> jax.Array:
    """x: (B, H, W, C) latent -> (B, L_stage, d) tokens with positional embedding."""
    tokens = self.x_embedders[stage](patchify(x.astype(self.dtype), self.schedule.stages[stage].patch))
    return tokens + self.pos_embed(stage).astype(tokens.dtype)

  def condition(self, t: jax.Array, y: jax.Array, stage: int | jax.Array) -> jax.Array:
    """t: (B,) in [0, 1]; y: (B,) labels (num_classes = null); stage: int or (B,) -> c: (B, d)."""
    c = self.t_embedder(t) + self.y_embedder(y)
    if self.level_embedder is not None:
      c = c + self.level_embedder(jnp.broadcast_to(jnp.asarray(stage, jnp.int32), t.shape))
    return c

  def run_blocks(self, tokens: jax.Array, c: jax.Array, layout: dit.TokenLayout | None = None,
                 stages: jax.Array | None = None) -> jax.Array:
    """tokens: (B, L, d); c: (S, d) per sample (S == B unless packed); stages: (S,) int stage
    of each sample (needed with LoRA adapters, models/lora.py) -> (B, L, d)."""
    weights = None
    if self.lora and stages is not None:
      weights = dit.per_token(jax.nn.one_hot(stages, len(self.schedule), dtype=c.dtype), layout)
    return block_stack.run(self.blocks, tokens, lambda block, x: block(x, c, layout, weights),
                           remat=self.remat)

  def unembed(self, tokens: jax.Array, c: jax.Array, stage: int) -> jax.Array:
    """tokens: (B, L_stage, d); c: (B, d) -> velocity (B, H, W, C) in float32 (sigma dropped)."""
    out = self.final_linears[stage](self.final_modulation(tokens, c, None))
    out = unpatchify(out, self.schedule.stages[stage].patch, self.schedule.latent_hw)
    return out[..., :self.in_channels].astype(jnp.float32)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, stage: int) -> jax.Array:
    """x: (B, H, W, C); t: (B,); y: (B,) int; stage: static int -> velocity (B, H, W, C)."""
    c = self.condition(t, y, stage)
    stages = jnp.full(t.shape, stage, jnp.int32)
    return self.unembed(self.run_blocks(self.embed(x, stage), c, stages=stages), c, stage)
