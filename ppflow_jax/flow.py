"""Flow matching: the linear path, the velocity target, stage-bucketed timesteps and the loss.

Path (SiT, PPFlow): x_t = t * x1 + (1 - t) * x0 with x0 ~ N(0, I) noise at t = 0 and data x1 at
t = 1; the network regresses the velocity x1 - x0 with a plain per-sample MSE over all latent
elements. A training batch is *bucketed by stage*: a fixed number of samples per stage
(`Schedule.bucket_sizes`), so every array shape is static and each stage's forward is one program.

Training regimes (`config.train.regime`) decide where each bucket's times come from:
- `ppflow`: t ~ U(stage range): each patch size is trained only on its own times (the paper).
- `flexidit`: t ~ U(0, 1) for every patch size (FlexiDiT).
- `lumina`: every patch size sees all times, shifted (Lumina-Video): u ~ U(0, 1) mapped by
  t = s u / (1 + (s - 1) u) with s = shift^(2i/(n-1) - 1) for stage i of n: the largest patch
  (s = 1/shift) gets more high-noise times (t near 0), the smallest (s = shift) more low-noise ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ppflow_jax import stages as stages_lib


def interpolate(x0: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
  """x0, x1: (B, H, W, C); t: (B,) -> x_t (B, H, W, C)."""
  t = t.reshape((-1,) + (1,) * (x1.ndim - 1))
  return t * x1 + (1.0 - t) * x0


def velocity_target(x0: jax.Array, x1: jax.Array) -> jax.Array:
  return x1 - x0


def shift_time(u: jax.Array, shift: float) -> jax.Array:
  """Maps u in [0, 1] to s u / (1 + (s - 1) u): s > 1 favours t near 1 (low noise)."""
  return shift * u / (1.0 + (shift - 1.0) * u)


def lumina_shift(stage: int, num_stages: int, shift: float) -> float:
  """The per-stage shift of the 'lumina' regime: 1/shift for the coarsest, shift for the finest."""
  if num_stages == 1:
    return 1.0
  return shift ** (2.0 * stage / (num_stages - 1) - 1.0)


def sample_times(key: jax.Array, schedule: stages_lib.Schedule, sizes: tuple[int, ...],
                 regime: str = 'ppflow', shift: float = 3.0) -> list[jax.Array]:
  """Times for each stage bucket: a list of (sizes[i],) float32 arrays."""
  out = []
  for i, (stage, n) in enumerate(zip(schedule.stages, sizes)):
    u = jax.random.uniform(jax.random.fold_in(key, i), (n,), jnp.float32)
    if regime == 'ppflow':
      out.append(stage.t_start + (stage.t_end - stage.t_start) * u)
    elif regime == 'flexidit':
      out.append(u)
    elif regime == 'lumina':
      out.append(shift_time(u, lumina_shift(i, len(schedule), shift)))
    else:
      raise ValueError(f'unknown training regime {regime!r}')
  return out


def drop_labels(key: jax.Array, y: jax.Array, prob: float, null_class: int) -> jax.Array:
  """y: (B,) -> labels replaced by the null class with probability `prob` (CFG training)."""
  if prob <= 0:
    return y
  return jnp.where(jax.random.uniform(key, y.shape) < prob, null_class, y)


def per_sample_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """pred, target: (B, H, W, C) -> (B,) mean squared error over all latent elements."""
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=tuple(range(1, pred.ndim)))
