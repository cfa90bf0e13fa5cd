"""Sampling benchmark: SiT vs PPF-2 vs PPF-3 side by side in one process.

Same size, batch, sampler, steps, CFG scale (one scale for every stage, so every evaluation runs
a doubled CFG batch unless --cfg_scale=1) and precision for all models. Per model: images/s,
ms per model evaluation (NFE, one forward of the whole CFG batch) per stage, the measured speedup
over SiT next to its FLOPs bound (flops.py), achieved TFLOP/s and MFU, compile time (first call
minus the steady median) and peak device memory. After one warm-up call per model, the timed
repeats run in interleaved rounds (every model once per round), so a speedup is the median of
per-round ratios, each taken under one load; medians and spreads (min/max, IQR) are reported.

  python -m ppflow_jax.bench.sample --config=bench:B --config.sample.batch_size=64 --steps=50 \
      --json=sample.json --markdown
  python -m ppflow_jax.bench.sample --config=bench:tiny --steps=8   # CI-sized, any CPU
"""

from __future__ import annotations

import dataclasses

import jax
from absl import flags
from flax import nnx

from ppflow_jax import cli
from ppflow_jax import flops
from ppflow_jax import inference
from ppflow_jax import sampling
from ppflow_jax.bench import common
from ppflow_jax.models import build_model


def prepare_model(name: str, opts: dict, spec: sampling.SamplerSpec, seed: int = 0) -> dict:
  """Model `name` ready to sample: its config, schedule, evaluation counts and a timed `run`."""
  config = common.make_config(name, opts)
  model = inference.Inference.from_params(
      config, nnx.to_pure_dict(nnx.state(build_model(config, nnx.Rngs(seed)))))
  sampler = model.sampler(**dataclasses.asdict(spec))
  b = opts['batch']
  k_noise, k_label = jax.random.split(jax.random.key(seed))
  noise = jax.random.normal(k_noise, (b, config.latent.height, config.latent.width,
                                      config.latent.channels))
  labels = jax.random.randint(k_label, (b,), 0, config.model.num_classes)

  def run() -> tuple[float, list[float]]:
    """One sampling call -> (seconds, seconds per stage), each segment timed to completion."""
    _, timing = sampling.timed_sample(sampler, model.params, noise, labels)
    return timing.seconds, timing.per_stage(len(model.schedule))

  return dict(name=name, config=config, schedule=model.schedule, sampler=sampler, run=run,
              evaluations=sampling.num_evaluations(model.schedule, spec))


def summarize(m: dict, opts: dict, spec: sampling.SamplerSpec, first: float,
              runs: list[tuple[float, list[float]]]) -> dict:
  """One model's result row from its warm-up time and timed runs."""
  config, schedule, evals, b = m['config'], m['schedule'], m['evaluations'], opts['batch']
  total = common.spread([r[0] for r in runs])
  run_flops = flops.sampling_flops(config, spec)['flops_with_cfg'] * b
  achieved = run_flops / total['median']
  device = common.device_info()
  stages = []
  for s, st in enumerate(schedule.stages):
    ms = (common.spread([1e3 * r[1][s] / evals[s] for r in runs]) if evals[s] else None)
    stages.append(dict(stage=s, patch=list(st.patch), tokens=schedule.num_tokens(s),
                       evaluations=evals[s], ms_per_nfe=ms))
  return dict(model=m['name'], label=common.LABELS[m['name']], stages=stages, seconds=total,
              images_per_second=b / total['median'], compile_seconds=first - total['median'],
              flops=run_flops, achieved_tflops=achieved / 1e12, mfu=common.mfu(achieved, device),
              peak_memory_bytes=common.peak_memory_bytes(), traces=m['sampler'].trace_count,
              testing_flops_ratio=flops.testing_flops_ratio(config, spec))


def run_benchmark(opts: dict, spec: sampling.SamplerSpec) -> dict:
  """All models of `opts['models']`, timed in interleaved rounds after one warm-up call each;
  speedups over the first model (SiT by default) are medians of per-round ratios."""
  models = {n: prepare_model(n, opts, spec) for n in opts['models']}
  first = {n: m['run']()[0] for n, m in models.items()}
  runs = common.interleaved({n: m['run'] for n, m in models.items()}, opts['repeats'])
  results = [summarize(models[n], opts, spec, first[n], runs[n]) for n in models]
  base = results[0]
  for r, n in zip(results, models):
    r['speedup_rounds'] = common.round_ratios([t for t, _ in runs[base['model']]],
                                              [t for t, _ in runs[n]])
    r['speedup'] = r['speedup_rounds']['median']
    r['speedup_flops_bound'] = base['flops'] / r['flops']
    r['speedup_vs_bound'] = r['speedup'] / r['speedup_flops_bound']
  return dict(benchmark='sample', device=common.device_info(), options=common.as_json(opts),
              sampler=dict(method=spec.method, num_steps=spec.num_steps), results=results)


def table(result: dict) -> tuple[list[str], list[list[str]]]:
  headers = ['model', 'images/s', 'spread (min-max s)', 'ms/NFE per stage', 'speedup',
             'FLOPs bound', 'TFLOP/s', 'MFU', 'compile s', 'peak mem GiB']
  rows = []
  for r in result['results']:
    per_stage = ' / '.join(
        f"{'x'.join(map(str, s['patch']))}: {common.fmt(s['ms_per_nfe'] and s['ms_per_nfe']['median'])}"
        for s in r['stages'])
    mem = r['peak_memory_bytes']
    rows.append([r['label'], f"{r['images_per_second']:.3g}",
                 f"{r['seconds']['min']:.3g}-{r['seconds']['max']:.3g}", per_stage,
                 f"{r['speedup']:.2f}x", f"{r['speedup_flops_bound']:.2f}x",
                 f"{r['achieved_tflops']:.3g}", common.fmt(r['mfu'], '.1%'),
                 f"{r['compile_seconds']:.3g}", common.fmt(mem and mem / 2**30, '.2f')])
  return headers, rows


def main(argv) -> None:
  f = flags.FLAGS
  opts, steps = common.command_line(argv)
  opts['cfg_scale'] = f.cfg_scale
  spec = sampling.SamplerSpec(method=f.method, num_steps=steps + 1)
  result = run_benchmark(opts, spec)
  common.print_result(result, *table(result),
                      f"batch {opts['batch']}, {f.method} {steps} steps, {opts['dtype']}, "
                      f"cfg {opts['cfg_scale']}, {opts['repeats']} repeats")


if __name__ == '__main__':
  common.define_flags()
  flags.DEFINE_integer('steps', 50, 'Integration steps (grid points = steps + 1).')
  flags.DEFINE_enum('method', 'heun', ['euler', 'heun', 'sde'], 'Sampler.')
  flags.DEFINE_float('cfg_scale', 1.5, 'CFG scale of every stage of every model (1 = no CFG).')
  cli.run(main)
