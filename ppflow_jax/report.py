"""Sample grids, loss plots and the end-of-run report (PPF vs the same weights at the finest patch).

The report samples the same noise and labels twice, side by side in one process: once with the
stage schedule and once forced to the finest patch (the SiT-equivalent cost of the same model),
each compiled and warmed up first, then timed over repeats. It sets the measured speed-up next to
the analytic FLOPs ratio (flops.py) and, on Fashion-MNIST, the FID of both sample sets under the
Fashion-MNIST feature network (evaluation/fmnist_features.py).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from ppflow_jax import sampling


def to_uint8(x) -> np.ndarray:
  """(N, H, W, C) in [-1, 1] -> uint8 (N, H, W, C)."""
  return np.asarray(jnp.clip((jnp.asarray(x) + 1.0) * 127.5 + 0.5, 0, 255)).astype(np.uint8)


def save_grid(images: np.ndarray, path: str, nrow: int, scale: int = 1) -> None:
  """images: uint8 (N, H, W, C) -> one PNG with `nrow` images per row."""
  n, h, w, c = images.shape
  rows = -(-n // nrow)
  grid = np.zeros((rows * h, nrow * w, c), np.uint8)
  for i, im in enumerate(images):
    r, col = divmod(i, nrow)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = im
  img = Image.fromarray(grid[..., 0] if c == 1 else grid)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  img.save(path)


def grid_labels(num_images: int, num_classes: int) -> np.ndarray:
  """Class-conditional grid labels: each row of the grid is one class (row-major)."""
  per_class = max(1, num_images // min(num_classes, num_images))
  return (np.arange(num_images) // per_class % num_classes).astype(np.int32)


def decode(config: ml_collections.ConfigDict, latents: jax.Array, vae=None) -> jax.Array:
  """Model latents -> images in [-1, 1]: the VAE decoder when there is one, else the identity."""
  if vae is None:
    return latents
  return vae.decode(latents / config.vae.scaling_factor)


def generate(trainer, params, config: ml_collections.ConfigDict, labels: np.ndarray, seed: int,
             **spec_overrides) -> jax.Array:
  """Samples latents (N, H, W, C) for `labels` with config.sample (plus overrides)."""
  spec = sampling.SamplerSpec.from_config(config, **spec_overrides)
  sampler = sampling.Sampler(trainer.graphdef, trainer.schedule, spec, config.model.num_classes)
  noise, keys = initial_noise(config, len(labels), seed)
  return sampler.sample(params, noise, jnp.asarray(labels), keys)


def initial_noise(config: ml_collections.ConfigDict, n: int, seed: int):
  """Per-sample noise (n, H, W, C) and SDE keys (n,), sample i depending only on (seed, i)."""
  shape = (config.latent.height, config.latent.width, config.latent.channels)

  def one(i):
    k_noise, k_path = jax.random.split(jax.random.fold_in(jax.random.key(seed), i))
    return jax.random.normal(k_noise, shape), k_path
  return jax.vmap(one)(jnp.arange(n))


def save_sample_grid(trainer, state, config, path: str, vae=None) -> None:
  """A class-conditional grid of config.sample.num_images EMA samples."""
  labels = grid_labels(config.sample.num_images, config.model.num_classes)
  x = decode(config, generate(trainer, state.ema, config, labels, config.seed), vae)
  save_grid(to_uint8(x), path, nrow=max(1, config.sample.num_images // min(
      config.model.num_classes, config.sample.num_images)), scale=2)


def plot_losses(metrics_file: str, path: str) -> None:
  """Loss (total and per stage) against step from metrics.jsonl."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  with open(metrics_file) as f:
    records = [json.loads(line) for line in f if line.strip()]
  steps = [r['step'] for r in records]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for key in sorted(k for k in records[0] if k.startswith('loss')):
    ax.plot(steps, [r[key] for r in records], label=key)
  ax.set_xlabel('step')
  ax.set_ylabel('flow-matching MSE')
  ax.set_yscale('log')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def time_sampling(trainer, params, config, labels: np.ndarray, repeats: int = 3,
                  **spec_overrides) -> tuple[np.ndarray, list[float]]:
  """Samples once to compile (excluded), then `repeats` timed runs -> (samples, seconds)."""
  spec = sampling.SamplerSpec.from_config(config, **spec_overrides)
  sampler = sampling.Sampler(trainer.graphdef, trainer.schedule, spec, config.model.num_classes)
  noise, keys = initial_noise(config, len(labels), config.seed)
  y = jnp.asarray(labels)
  out = jax.block_until_ready(sampler.sample(params, noise, y, keys))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(sampler.sample(params, noise, y, keys))
    times.append(time.perf_counter() - t0)
  return np.asarray(out), times


def final_report(trainer, state, config: ml_collections.ConfigDict, workdir: str,
                 vae=None, evaluator=None) -> dict:
  """Writes samples.png, loss.png, report.json and report.md in `workdir`; returns the numbers."""
  from ppflow_jax import flops  # pylint: disable=g-import-not-at-top
  labels = grid_labels(config.sample.num_images, config.model.num_classes)
  ppf, t_ppf = time_sampling(trainer, state.ema, config, labels)
  finest, t_finest = time_sampling(trainer, state.ema, config, labels, force_finest=True)
  nrow = max(1, config.sample.num_images // min(config.model.num_classes, config.sample.num_images))
  save_grid(to_uint8(decode(config, ppf, vae)), os.path.join(workdir, 'samples.png'), nrow, 2)
  save_grid(to_uint8(decode(config, finest, vae)), os.path.join(workdir, 'samples_finest.png'),
            nrow, 2)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(metrics):
    plot_losses(metrics, os.path.join(workdir, 'loss.png'))
  spec = sampling.SamplerSpec.from_config(config)
  result = dict(
      sampler=f'{spec.method}, {spec.num_steps} grid points, CFG {list(config.schedule.cfg_scales)}'
              f' on {spec.cfg_channels} channels',
      num_images=len(labels),
      ppf_seconds=float(np.median(t_ppf)), finest_seconds=float(np.median(t_finest)),
      measured_speedup=float(np.median(t_finest) / np.median(t_ppf)),
      flops_ratio=float(flops.testing_flops_ratio(config, spec)),
      device=jax.devices()[0].device_kind, steps=int(jax.device_get(state.step)))
  result['flops_speedup_bound'] = 1.0 / result['flops_ratio']
  if evaluator is not None:  # scored as saved: clipped to the image range
    for name, x in (('ppf', ppf), ('finest', finest)):
      result[f'fid_{name}'] = evaluator.score(np.clip(decode(config, x, vae), -1, 1))['fid']
  with open(os.path.join(workdir, 'report.json'), 'w') as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write(report_markdown(result))
  return result


def report_markdown(r: dict) -> str:
  lines = [
      f'# Run report (step {r["steps"]}, {r["device"]})', '',
      f'Sampler: {r["sampler"]}; {r["num_images"]} images per run, median of 3 timed runs '
      'after a compile/warm-up run, same noise and labels.', '',
      '| sampling | seconds | speed-up | testing FLOPs | FID (Fashion-MNIST features) |',
      '|---|---|---|---|---|',
      f'| PPF (stage schedule) | {r["ppf_seconds"]:.2f} | {r["measured_speedup"]:.2f}x | '
      f'{100 * r["flops_ratio"]:.1f}% | {r.get("fid_ppf", float("nan")):.2f} |',
      f'| same weights, finest patch only | {r["finest_seconds"]:.2f} | 1.00x | 100% | '
      f'{r.get("fid_finest", float("nan")):.2f} |', '',
      f'FLOPs bound on the speed-up: {r["flops_speedup_bound"]:.2f}x.', '',
      '![samples](samples.png) ![loss](loss.png)', '']
  return '\n'.join(lines)
