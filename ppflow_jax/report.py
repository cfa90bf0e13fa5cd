"""Sample grids, loss plots and the end-of-run report (PPF vs the same weights at the finest patch).

The report samples the same noise and labels twice, side by side in one process: once with the
stage schedule and once forced to the finest patch (the SiT-equivalent cost of the same model),
each compiled and warmed up first, then timed over repeats. It sets the measured speed-up next to
the analytic FLOPs ratio (flops.py) and, on Fashion-MNIST, the FID of both sample sets under the
Fashion-MNIST feature network (evaluation/fmnist_features.py).
"""

from __future__ import annotations

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ppflow_jax import flops
from ppflow_jax import inference
from ppflow_jax import paths
from ppflow_jax import sampling
from ppflow_jax import summary


def to_uint8(x) -> np.ndarray:
  """(N, H, W, C) in [-1, 1] -> uint8 (N, H, W, C)."""
  return np.asarray(jnp.clip((jnp.asarray(x) + 1.0) * 127.5 + 0.5, 0, 255)).astype(np.uint8)


def make_grid(images: np.ndarray, nrow: int, scale: int = 1) -> np.ndarray:
  """images: uint8 (N, H, W, C) -> one uint8 (rows*H*scale, nrow*W*scale, C) image, row-major."""
  n, h, w, c = images.shape
  rows = -(-n // nrow)
  grid = np.zeros((rows * h, nrow * w, c), np.uint8)
  for i, im in enumerate(images):
    r, col = divmod(i, nrow)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = im
  return grid.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else grid


def save_png(image: np.ndarray, path: str) -> None:
  """uint8 (H, W, C) -> a PNG at `path` (a local path or a URL, paths.py)."""
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format='PNG')
  paths.write_bytes(path, buffer.getvalue())


def save_figure(fig, path: str, dpi: int = 100) -> None:
  """A matplotlib figure -> a PNG at `path` (a local path or a URL); closes the figure."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=dpi)
  plt.close(fig)
  paths.write_bytes(path, buffer.getvalue())


def save_grid(images: np.ndarray, path: str, nrow: int, scale: int = 1) -> None:
  """images: uint8 (N, H, W, C) -> one PNG with `nrow` images per row."""
  save_png(make_grid(images, nrow, scale), path)


def grid_labels(num_images: int, num_classes: int) -> np.ndarray:
  """Class-conditional grid labels: each row of the grid is one class (row-major)."""
  per_class = max(1, num_images // min(num_classes, num_images))
  return (np.arange(num_images) // per_class % num_classes).astype(np.int32)


def ms_per_evaluation(sampler: sampling.Sampler, steady: list[sampling.Timing]) -> list[dict]:
  """Median milliseconds per model evaluation of each (patch, passes) group of a run."""
  rows = []
  for (stage, guided), n in sorted(sampling.evaluations_by_group(sampler.schedule,
                                                                 sampler.spec).items()):
    rows.append(dict(stage=stage, patch=list(sampler.schedule.stages[stage].patch),
                     passes=2 if guided else 1, evaluations=n,
                     ms=float(np.median([1e3 * t.groups[stage, guided] / n for t in steady]))))
  return rows


def sample_grid(model: inference.Inference, labels=None) -> np.ndarray:
  """A grid of `model`'s samples for `labels` (default: config.sample.num_images, one class per
  row), decoded with its VAE when there is one: uint8 (H, W, C). Every process must call it (the
  sampler runs on the sharded weights); every process gets the whole grid."""
  config = model.config
  if labels is None:
    labels = grid_labels(config.sample.num_images, config.model.num_classes)
    nrow = max(1, config.sample.num_images // min(config.model.num_classes,
                                                  config.sample.num_images))
  else:
    labels, nrow = np.asarray(labels, np.int32), min(len(labels), 8)
  x = model.decode(model.generate(labels, config.seed))
  return make_grid(to_uint8(sampling.to_host(x) if isinstance(x, jax.Array) else x), nrow, scale=2)


def save_sample_grid(model: inference.Inference, path: str, labels=None) -> None:
  """`sample_grid` as a PNG."""
  save_png(sample_grid(model, labels), path)


def plot_losses(metrics_file: str, path: str) -> None:
  """Loss (total and per stage) against step from metrics.jsonl."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  records = summary.read_records(metrics_file)
  steps = [r['step'] for r in records]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for key in sorted(k for k in records[0] if k.startswith('loss')):
    ax.plot(steps, [r[key] for r in records], label=key)
  ax.set_xlabel('step')
  ax.set_ylabel('flow-matching MSE')
  ax.set_yscale('log')
  ax.legend()
  fig.tight_layout()
  save_figure(fig, path)


def final_report(model: inference.Inference, workdir: str, evaluator=None) -> dict:
  """Writes samples.png, loss.png, report.json and report.md in `workdir`; returns the numbers.

  model: the trained weights (EMA) to report on; evaluator: an object whose `score(images)`
  returns {'fid': ...} (evaluation/fmnist_features.py), or None for no FID.

  PPF and the same weights at the finest patch sample the same noise and labels in batches of
  config.sample.batch_size; per-batch times exclude compilation (the first batch) and are
  reported as median (min-max). FID uses all config.eval.report_samples samples.
  """
  config = model.config
  num_classes = config.model.num_classes
  n = max(config.sample.num_images, config.eval.report_samples)
  labels = np.concatenate([grid_labels(config.sample.num_images, num_classes),
                           np.arange(n - config.sample.num_images) % num_classes]).astype(np.int32)
  nrow = max(1, config.sample.num_images // min(num_classes, config.sample.num_images))
  result = dict(num_images=n, batch_size=config.sample.batch_size,
                device=jax.devices()[0].device_kind, steps=model.step)
  images, specs = {}, {}
  for name, overrides in (('ppf', {}), ('finest', {'force_finest': True})):
    sampler = model.sampler(**overrides)
    specs[name] = sampler.spec
    bs = config.sample.batch_size
    latents, timings = sampling.sample_in_chunks(sampler, model.params, model.latent_shape, labels,
                                                 config.seed, bs)
    steady = sampling.steady_timings(sampler, model.params, model.latent_shape, labels, bs,
                                     timings)
    seconds = [t.seconds for t in steady]
    result[f'{name}_batch_seconds'] = float(np.median(seconds))
    result[f'{name}_batch_seconds_range'] = [float(min(seconds)), float(max(seconds))]
    result[f'{name}_ms_per_evaluation'] = ms_per_evaluation(sampler, steady)
    result[f'{name}_forward_passes'] = sum(sampling.forward_passes(sampler.schedule, sampler.spec))
    images[name] = np.clip(np.asarray(model.decode(latents)), -1.0, 1.0)
    suffix = '' if name == 'ppf' else '_finest'
    save_grid(to_uint8(images[name][:config.sample.num_images]),
              paths.join(workdir, f'samples{suffix}.png'), nrow, 2)
  spec = specs['ppf']
  result.update(
      sampler=f'{spec.method}, {spec.num_steps} grid points, CFG {list(config.schedule.cfg_scales)}'
              f' on {spec.cfg_channels} channels',
      measured_speedup=result['finest_batch_seconds'] / result['ppf_batch_seconds'],
      # Both rows timed with CFG as they run it, so the bound counts their guidance passes too.
      flops_ratio=float(flops.testing_flops_ratio(config, spec, cfg=True)),
      flops_ratio_without_cfg=float(flops.testing_flops_ratio(config, spec)))
  result['flops_speedup_bound'] = 1.0 / result['flops_ratio']
  if evaluator is not None:
    for name, x in images.items():
      result[f'fid_{name}'] = float(evaluator.score(x)['fid'])
  metrics = paths.join(workdir, summary.METRICS)
  if paths.exists(metrics):
    plot_losses(metrics, paths.join(workdir, 'loss.png'))
  paths.write_text(paths.join(workdir, 'report.json'), json.dumps(result, indent=2))
  paths.write_text(paths.join(workdir, 'report.md'), report_markdown(result))
  return result


def _ms_per_evaluation_line(groups: list[dict]) -> str:
  return ', '.join(f"{'x'.join(map(str, g['patch']))} {'with' if g['passes'] == 2 else 'without'} "
                   f"guidance pass: {g['ms']:.1f} ms x {g['evaluations']}" for g in groups)


def report_markdown(r: dict) -> str:
  def row(name, label, speedup, flops_pct):
    lo, hi = r[f'{name}_batch_seconds_range']
    return (f'| {label} | {r[f"{name}_batch_seconds"]:.2f} ({lo:.2f}-{hi:.2f}) | {speedup} | '
            f'{r[f"{name}_forward_passes"]} | {flops_pct} | '
            f'{r.get(f"fid_{name}", float("nan")):.2f} |')
  return '\n'.join([
      f'# Run report (step {r["steps"]}, {r["device"]})', '',
      f'Sampler: {r["sampler"]}. Same noise and labels for both rows, and the same passes at every '
      'time (the unconditional pass is skipped where the CFG scale is 1.0, in both rows); seconds '
      f'per batch of {r["batch_size"]}, median (min-max) over batches after the first '
      f'(compilation excluded); FID over {r["num_images"]} samples under the Fashion-MNIST '
      'feature network.', '',
      '| sampling | s / batch | speed-up | forward passes | testing FLOPs (with CFG as run) | FID |',
      '|---|---|---|---|---|---|',
      row('ppf', 'PPF (stage schedule)', f'{r["measured_speedup"]:.2f}x',
          f'{100 * r["flops_ratio"]:.1f}%'),
      row('finest', 'same weights, finest patch only', '1.00x', '100%'), '',
      f'FLOPs bound on the speed-up: {r["flops_speedup_bound"]:.2f}x (CFG passes counted as run; '
      f'{100 * r["flops_ratio_without_cfg"]:.1f}% of the FLOPs without them, the paper\'s '
      'convention).', '',
      'Milliseconds per model evaluation (median per batch): PPF '
      f'{_ms_per_evaluation_line(r["ppf_ms_per_evaluation"])}; finest only '
      f'{_ms_per_evaluation_line(r["finest_ms_per_evaluation"])}.', '',
      '![samples](samples.png) ![loss](loss.png)', ''])
