"""Side-by-side sampling benchmark: this project (JAX) vs the PyTorch reference model.

The reference is `third_party/torch_ref.TorchPPF` (SiT and the official PPFlow layout, attention
through torch's fused `scaled_dot_product_attention`). Both sides get the same weights (the
torch model's random init, imported with `convert.sit`), noise, labels, size, batch, precision,
step grid, stage plan and CFG: the torch loop follows `sampling.plan` segment by segment, with
the same guided / unguided passes, so both count the same evaluations and the final samples agree
(`max_sample_diff`). Per model and side: ms per evaluation per stage (one evaluation = one
forward of the whole, CFG-doubled, batch) and the whole-trajectory time; the PPF speed-ups over
SiT next to the FLOPs bound counted with the same passes (`flops.sampling_flops`).

Rounds alternate (round r runs every model, JAX first on even r, torch first on odd r) after one
warm-up trajectory per side (compiles), so load from other processes hits both sides alike;
medians and min-max are reported, and a speed-up over SiT is the median of its per-round ratios. Torch is optional: without it the benchmark prints why and
exits 0.

  python -m ppflow_jax.bench.vs_torch --config=bench:S --config.sample.batch_size=8 \
      --config.model.dtype=float32 --steps=6 --cfg_scale=1.5 --rounds=3 \
      --json=docs/vs_torch_cpu.json --markdown
  python -m ppflow_jax.bench.vs_torch --config=bench:tiny --steps=4 --rounds=2
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from ppflow_jax import cli
from ppflow_jax import flops
from ppflow_jax import inference
from ppflow_jax import sampling
from ppflow_jax import stages as stages_lib
from ppflow_jax.bench import common
from ppflow_jax.convert import sit as sit_lib

# CFG scales per stage as the paper samples (REFERENCE_NOTES: FID scales [1.0, 3.0] for XL-2,
# [1.0, 3.5, 3.75] for XL-3; SiT-XL/2's 1.5). A stage at 1.0 runs the conditional pass only.
PAPER_CFG = {'sit': (1.5,), 'ppf2': (1.0, 3.0), 'ppf3': (1.0, 3.5, 3.75)}


def import_torch():
  """(torch, TorchPPF), or None when torch or the reference is not importable here."""
  try:
    import torch
    from third_party.torch_ref import TorchPPF
  except ImportError as e:
    print(f'vs_torch: skipped, the PyTorch reference is unavailable ({e}); '
          'pip install torch and run from the repository root.')
    return None
  return torch, TorchPPF


class TorchSampler:
  """The reference model sampled on `sampling.plan`'s segments, as `sampling.Sampler` does."""

  def __init__(self, torch, model, schedule: stages_lib.Schedule, spec: sampling.SamplerSpec,
               null_class: int, dtype: str):
    if spec.method not in ('heun', 'euler') or spec.cfg_channels != 'all' or spec.force_finest:
      raise ValueError('vs_torch compares heun/euler sampling with cfg_channels=all only')
    self.torch, self.model, self.schedule, self.spec = torch, model, schedule, spec
    self.null_class = null_class
    self.device = next(model.parameters()).device
    self.autocast = dtype == 'bfloat16'
    self.segments = sampling.plan(schedule, spec)
    self.steps = sampling.integration_steps(spec)

  def _sync(self):
    if self.device.type == 'cuda':
      self.torch.cuda.synchronize()

  def _velocity(self, x, t: float, y, stage: int, guided: bool):
    torch = self.torch
    scale = self.schedule.stages[self.schedule.stage_index(min(t, 1.0))].cfg_scale
    n = x.shape[0]
    with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
      if not guided:
        return self.model(x, torch.full((n,), t, device=self.device), y, stage).float()
      both = self.model(torch.cat([x, x]), torch.full((2 * n,), t, device=self.device),
                        torch.cat([y, torch.full_like(y, self.null_class)]), stage).float()
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)

  def sample(self, noise, labels) -> tuple[object, list[float]]:
    """noise: (B, C, H, W); labels: (B,) -> (samples, seconds per stage)."""
    t_all, dt_all = self.steps.t, self.steps.dt
    heun = self.spec.method == 'heun'
    per_stage = [0.0] * len(self.schedule)
    x, pending = noise.float(), None
    with self.torch.no_grad():
      for seg in self.segments:
        start = time.perf_counter()
        vel = lambda x, t: self._velocity(x, float(t), labels, seg.stage, seg.guided)
        if seg.finish_pending:
          v, x_pred, k = pending
          x = x + 0.5 * dt_all[k] * (v + vel(x_pred, t_all[k] + dt_all[k]))
        for k in range(seg.start, seg.stop):
          v = vel(x, t_all[k])
          x = x + (0.5 * dt_all[k] * (v + vel(x + dt_all[k] * v, t_all[k] + dt_all[k])) if heun
                   else dt_all[k] * v)
        if seg.begin_crossing:
          k = seg.stop
          v = vel(x, t_all[k])
          pending = (v, x + dt_all[k] * v, k)
        self._sync()
        per_stage[seg.stage] += time.perf_counter() - start
    return x, per_stage


def _jax_sampler(model: inference.Inference, spec: sampling.SamplerSpec, noise: jax.Array,
                 labels: jax.Array) -> Callable:
  """() -> (samples, seconds per stage) of `model` sampled with `spec`."""
  sampler = model.sampler(**dataclasses.asdict(spec))

  def run():
    x, timing = sampling.timed_sample(sampler, model.params, noise, labels)
    return x, timing.per_stage(len(model.schedule))
  return run


def build_pair(name: str, opts: dict, spec: sampling.SamplerSpec, torch, torch_model_cls,
               seed: int = 0) -> dict:
  """Both samplers of model `name` with identical weights, noise and labels."""
  cfg_scales = PAPER_CFG[name] if opts['paper_cfg'] else None
  config = common.make_config(name, opts, cfg_scales)
  m, lat = config.model, config.latent
  schedule = stages_lib.from_config(config)
  fine = schedule.finest.patch
  if fine[0] != fine[1]:
    raise ValueError(f'{name}: the reference needs a square finest patch, got {fine}')
  torch.manual_seed(seed)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  tm = torch_model_cls(input_size=lat.height, patch_size=fine[0], in_channels=lat.channels,
                       hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads,
                       mlp_ratio=m.mlp_ratio, num_classes=m.num_classes,
                       learn_sigma=m.learn_sigma, levels=len(schedule)).eval()
  params = sit_lib.convert_state_dict(
      {k: v.detach().numpy() for k, v in tm.state_dict().items()}, config, source='torch_ref')
  model = inference.Inference.from_params(config, params)
  tm = tm.to(device)
  rng = np.random.default_rng(seed)
  b = opts['batch']
  noise = rng.standard_normal((b, lat.height, lat.width, lat.channels)).astype(np.float32)
  labels = rng.integers(0, m.num_classes, b)
  jax_run = _jax_sampler(model, spec, jnp.asarray(noise), jnp.asarray(labels, jnp.int32))
  ts = TorchSampler(torch, tm, schedule, spec, m.num_classes, config.model.dtype)
  t_noise = torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous().to(device)
  t_labels = torch.from_numpy(labels).to(device)
  return dict(config=config, schedule=schedule, jax=jax_run,
              torch=lambda: ts.sample(t_noise, t_labels))


def _timed(run: Callable) -> tuple[object, float, list[float]]:
  start = time.perf_counter()
  x, per_stage = run()
  return x, time.perf_counter() - start, per_stage


def run_benchmark(opts: dict, spec: sampling.SamplerSpec, torch, torch_model_cls) -> dict:
  """Warm-up, then `opts['rounds']` alternating rounds over `opts['models']`."""
  pairs = {n: build_pair(n, opts, spec, torch, torch_model_cls) for n in opts['models']}
  times = {n: {side: dict(total=[], stages=[]) for side in ('jax', 'torch')} for n in pairs}
  diffs, compile_s = {}, {}
  for n, p in pairs.items():
    xj, tj, _ = _timed(p['jax'])
    xt, _, _ = _timed(p['torch'])
    compile_s[n] = tj
    diffs[n] = float(np.abs(np.asarray(xj) - xt.permute(0, 2, 3, 1).cpu().numpy()).max())
    logging.info('warm-up %s: JAX %.3g s (compiles), max |JAX - torch| = %.2g', n, tj, diffs[n])
  for r in range(opts['rounds']):
    for n, p in pairs.items():
      for side in (('jax', 'torch') if r % 2 == 0 else ('torch', 'jax')):
        _, total, per_stage = _timed(p[side])
        logging.info('round %d %s %s: %.3g s', r, n, side, total)
        times[n][side]['total'].append(total)
        times[n][side]['stages'].append(per_stage)

  results = []
  for n, p in pairs.items():
    sf = flops.sampling_flops(p['config'], spec)
    row = dict(model=n, label=common.LABELS[n], cfg_scales=[s.cfg_scale for s in p['schedule'].stages],
               flops_per_image=sf['flops_with_cfg'], max_sample_diff=diffs[n],
               jax_first_call_seconds=compile_s[n], stages=[])
    for side in ('jax', 'torch'):
      row[f'{side}_seconds'] = common.spread(times[n][side]['total'])
    for s, st in enumerate(sf['stages']):
      stage = dict(stage=s, patch=list(st['patch']), tokens=st['tokens'],
                   evaluations=st['evaluations'], passes=st['passes'])
      for side in ('jax', 'torch'):
        stage[f'{side}_ms_per_eval'] = common.spread(
            [1e3 * per[s] / st['evaluations'] for per in times[n][side]['stages']])
      stage['jax_over_torch'] = (stage['jax_ms_per_eval']['median']
                                 / stage['torch_ms_per_eval']['median'])
      row['stages'].append(stage)
    row['jax_over_torch'] = row['jax_seconds']['median'] / row['torch_seconds']['median']
    results.append(row)
  base = results[0]
  for row in results:
    row['speedup_flops_bound'] = base['flops_per_image'] / row['flops_per_image']
    for side in ('jax', 'torch'):
      # Per-round ratios: within a round both models ran back to back under the same load.
      row[f'{side}_speedup_rounds'] = common.round_ratios(times[base['model']][side]['total'],
                                                          times[row['model']][side]['total'])
      row[f'{side}_speedup'] = row[f'{side}_speedup_rounds']['median']
      row[f'{side}_speedup_vs_bound'] = row[f'{side}_speedup'] / row['speedup_flops_bound']
  return dict(benchmark='vs_torch', device=common.device_info(), torch=torch.__version__,
              torch_threads=torch.get_num_threads(), options=common.as_json(opts),
              sampler=dict(method=spec.method, num_steps=spec.num_steps),
              results=results, acceptance=acceptance(results))


def acceptance(results: list[dict], tolerance: float = 0.10) -> dict:
  """Issue 13's criteria: JAX ms/eval <= torch's at every stage; speed-ups within 10% of bound."""
  slower = [f"{r['label']} {'x'.join(map(str, s['patch']))}: {s['jax_over_torch']:.2f}x"
            for r in results for s in r['stages'] if s['jax_over_torch'] > 1.0]
  off = [f"{r['label']}: {r['jax_speedup_vs_bound']:.2f} of the bound" for r in results[1:]
         if abs(r['jax_speedup_vs_bound'] - 1.0) > tolerance]
  return dict(every_stage_at_most_torch=not slower, stages_slower_than_torch=slower,
              speedups_within_10pct_of_bound=not off, speedups_off_bound=off)


def table(result: dict) -> tuple[list[str], list[list[str]]]:
  headers = ['model', 'stage', 'evals', 'JAX ms/eval (min-max)', 'torch ms/eval (min-max)',
             'JAX/torch', 'JAX traj s', 'torch traj s', 'JAX speedup', 'torch speedup',
             'FLOPs bound']
  rows = []
  span = lambda s, f='.0f': f"{s['median']:{f}} ({s['min']:{f}}-{s['max']:{f}})"
  for r in result['results']:
    for i, s in enumerate(r['stages']):
      first = i == 0
      rows.append([r['label'] if first else '', 'x'.join(map(str, s['patch'])),
                   str(s['evaluations']), span(s['jax_ms_per_eval']),
                   span(s['torch_ms_per_eval']), f"{s['jax_over_torch']:.2f}",
                   span(r['jax_seconds'], '.3g') if first else '',
                   span(r['torch_seconds'], '.3g') if first else '',
                   f"{r['jax_speedup']:.2f}x" if first else '',
                   f"{r['torch_speedup']:.2f}x" if first else '',
                   f"{r['speedup_flops_bound']:.2f}x" if first else ''])
  return headers, rows


def main(argv) -> None:
  f = flags.FLAGS
  opts, steps = common.command_line(argv)
  if f.rounds < 1:
    raise app.UsageError(f'--rounds={f.rounds} must be >= 1')
  found = import_torch()
  if found is None:
    return
  if f.torch_threads:
    found[0].set_num_threads(f.torch_threads)
  opts.update(cfg_scale=f.cfg_scale, paper_cfg=f.paper_cfg, rounds=f.rounds)
  spec = sampling.SamplerSpec(method=f.method, num_steps=steps + 1)
  result = run_benchmark(opts, spec, *found)
  headers, rows = table(result)
  dev = result['device']
  print(f"{dev['device_kind']} x{dev['device_count']}, jax {dev['jax']}, torch {result['torch']} "
        f"({result['torch_threads']} threads): batch {opts['batch']} images, {f.method} {steps} "
        f"steps, {opts['dtype']}, cfg {'paper' if opts['paper_cfg'] else opts['cfg_scale']}, "
        f"{opts['rounds']} alternating rounds")
  print(common.write_outputs(result, headers, rows, json_path=f.json, markdown=f.markdown))
  print('acceptance:', result['acceptance'])


if __name__ == '__main__':
  common.define_flags()
  flags.DEFINE_integer('steps', 6, 'Integration steps (grid points = steps + 1).')
  flags.DEFINE_enum('method', 'heun', ['euler', 'heun'], 'Sampler.')
  flags.DEFINE_float('cfg_scale', 1.5, 'CFG scale of every stage (1 = no CFG).')
  flags.DEFINE_bool('paper_cfg', False, f'Use the paper\'s per-stage scales {PAPER_CFG} instead.')
  flags.DEFINE_integer('rounds', 3, 'Alternating timed rounds after the warm-up.')
  flags.DEFINE_integer('torch_threads', 0, 'torch.set_num_threads (0 = torch\'s default).')
  cli.run(main)
