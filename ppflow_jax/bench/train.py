"""Training benchmark: SiT vs PPF-2 vs PPF-3 train steps, with and without Patch n' Pack.

Same size, latent, global batch and precision for all models; random latents and labels (step
time does not depend on the data). Per run: images/s, real (unpadded) tokens/s, the speedup in
images/s over SiT next to its FLOPs bound (flops.training_flops: 3 x forward per image over the
stage buckets), achieved TFLOP/s and MFU, compile time (first step minus the steady median) and
peak device memory. Each repeat times `--steps` consecutive steps (the state is donated, as in
training); after one warm-up step per run, repeats run in interleaved rounds (every run once per
round), so a speedup is the median of per-round ratios; medians and spreads are reported.

A packed step also computes its padding tokens, and with the segment-id kernels (splash,
pallas_gpu) a packed row attends over its full length; the packed rows' bound counts what the
step's attention implementation computes (flops.training_flops: `packed_flops_per_image` for
'xla', which attends within each sample slot, `packed_dense_flops_per_image` for the kernels).

  python -m ppflow_jax.bench.train --config=bench:XL --steps=10 --markdown
  python -m ppflow_jax.bench.train --config=bench:tiny --steps=2   # CI-sized, any CPU
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import flags

from ppflow_jax import cli
from ppflow_jax import flops
from ppflow_jax import sharding
from ppflow_jax.bench import common
from ppflow_jax.ops import attention as attention_ops
from ppflow_jax.train import Trainer


def prepare_model(name: str, packing: bool, *, opts: dict, steps: int, seed: int = 0) -> dict:
  """Model `name` with its train state and a `run` that times `steps` consecutive steps."""
  config = common.make_config(name, opts)
  b = config.train.batch_size
  config.train.packing = packing
  mesh = sharding.make_mesh(config)
  trainer = Trainer(config, mesh)
  k_x, k_y = jax.random.split(jax.random.key(seed))
  batch = jax.device_put(
      {'x': jax.random.normal(k_x, (b, config.latent.height, config.latent.width,
                                    config.latent.channels)),
       'y': jax.random.randint(k_y, (b,), 0, config.model.num_classes)},
      trainer.batch_sharding)
  with jax.set_mesh(mesh):
    carry = {'state': trainer.init_state(seed)}
  jax.block_until_ready(carry)

  def run(num_steps: int = steps) -> float:
    """Seconds per step over `num_steps` steps (the state is donated and carried on)."""
    with jax.set_mesh(mesh):
      start = time.perf_counter()
      for _ in range(num_steps):
        carry['state'], carry['metrics'] = trainer.step(carry['state'], batch)
      jax.block_until_ready(carry)
      return (time.perf_counter() - start) / num_steps

  return dict(name=name, config=config, trainer=trainer, packing=packing, run=run, carry=carry)


def summarize(m: dict, opts: dict, first: float, per_step: list[float]) -> dict:
  """One run's result row from its warm-up step time and timed seconds per step."""
  name, config, trainer, packing = m['name'], m['config'], m['trainer'], m['packing']
  if not bool(jnp.isfinite(m['carry']['metrics']['loss'])):
    raise RuntimeError(f'{name}: the benchmarked train step produced a non-finite loss')
  b = config.train.batch_size
  t = common.spread(per_step)
  tr = flops.training_flops(config)
  tokens = sum(n * trainer.schedule.num_tokens(s) for s, n in enumerate(trainer.bucket_sizes))
  step_flops = tr['flops_per_image'] * b
  device = common.device_info()
  mc = config.model
  impl = attention_ops.select_impl(
      mc.attention, backend=device['platform'], segmented=True, dtype=mc.dtype,
      seq_len=trainer.schedule.num_tokens(len(trainer.bucket_sizes) - 1),
      head_dim=mc.hidden_size // mc.num_heads)
  packed_key = 'packed_flops_per_image' if impl == 'xla' else 'packed_dense_flops_per_image'
  multi = len(trainer.bucket_sizes) > 1
  return dict(model=name, label=common.LABELS[name], packing=packing if multi else None,
              bucket_sizes=list(trainer.bucket_sizes), seconds_per_step=t,
              images_per_second=b / t['median'], tokens_per_second=tokens / t['median'],
              tokens_per_step=tokens, compile_seconds=first - t['median'],
              flops_per_step=step_flops,
              packed_attention=impl if packing and multi else None,
              packed_flops_per_step=(tr[packed_key] * b if packing and multi else None),
              achieved_tflops=step_flops / t['median'] / 1e12,
              mfu=common.mfu(step_flops / t['median'], device),
              peak_memory_bytes=common.peak_memory_bytes())


def run_benchmark(opts: dict, steps: int, packings: tuple[bool, ...] = (False, True),
                  interleave: bool = True) -> dict:
  """Every model x packing (SiT once: one stage has nothing to pack), after one warm-up step
  each; speedups over the first are medians of per-round ratios.

  interleave: time in interleaved rounds, every run's train state alive at once (a shared host:
  every round sees one load); False times one run at a time and frees it (a dedicated
  accelerator, where five XL train states would not fit side by side).
  """
  keys = [(name, packing) for name in opts['models']
          for packing in (packings if common.MODELS[name] > 1 else packings[:1])]
  first, runs, results = {}, {}, {}
  if interleave:
    models = {k: prepare_model(*k, opts=opts, steps=steps) for k in keys}
    first = {k: m['run'](1) for k, m in models.items()}
    runs = common.interleaved({k: m['run'] for k, m in models.items()}, opts['repeats'])
    results = {k: summarize(m, opts, first[k], runs[k]) for k, m in models.items()}
  else:
    for k in keys:
      m = prepare_model(*k, opts=opts, steps=steps)
      first[k] = m['run'](1)
      runs[k] = [m['run']() for _ in range(opts['repeats'])]
      results[k] = summarize(m, opts, first[k], runs[k])
      del m  # free this train state before the next one is built
  results = [results[k] for k in keys]
  base = results[0]
  for r, k in zip(results, keys):
    r['speedup_rounds'] = common.round_ratios(runs[keys[0]], runs[k])
    r['speedup'] = r['speedup_rounds']['median']
    r['speedup_flops_bound'] = base['flops_per_step'] / r['flops_per_step']
    r['speedup_vs_bound'] = r['speedup'] / r['speedup_flops_bound']
    packed = r['packed_flops_per_step']
    r['speedup_packed_bound'] = packed and base['flops_per_step'] / packed
  return dict(benchmark='train', device=common.device_info(), options=common.as_json(opts),
              steps=steps,
              results=results)


def table(result: dict) -> tuple[list[str], list[list[str]]]:
  headers = ['model', 'packing', 'images/s', 'tokens/s', 'step s (min-max)', 'speedup',
             'FLOPs bound', 'TFLOP/s', 'MFU', 'compile s', 'peak mem GiB']
  rows = []
  for r in result['results']:
    t, mem = r['seconds_per_step'], r['peak_memory_bytes']
    bound = f"{r['speedup_flops_bound']:.2f}x"
    if r['speedup_packed_bound']:
      bound += f" ({r['speedup_packed_bound']:.2f}x as packed, {r['packed_attention']})"
    rows.append([r['label'], {None: 'n/a', True: 'yes', False: 'no'}[r['packing']],
                 f"{r['images_per_second']:.3g}", f"{r['tokens_per_second']:.3g}",
                 f"{t['median']:.3g} ({t['min']:.3g}-{t['max']:.3g})", f"{r['speedup']:.2f}x",
                 bound, f"{r['achieved_tflops']:.3g}", common.fmt(r['mfu'], '.1%'),
                 f"{r['compile_seconds']:.3g}", common.fmt(mem and mem / 2**30, '.2f')])
  return headers, rows


def main(argv) -> None:
  opts, steps = common.command_line(argv)
  packings = {'both': (False, True), 'on': (True,), 'off': (False,)}[flags.FLAGS.packing]
  result = run_benchmark(opts, steps, packings)
  common.print_result(result, *table(result),
                      f"batch {opts['config'].train.batch_size}, {opts['dtype']}, "
                      f"{steps} steps x {opts['repeats']} repeats")


if __name__ == '__main__':
  common.define_flags()
  flags.DEFINE_integer('steps', 5, 'Train steps per timed repeat.')
  flags.DEFINE_enum('packing', 'both', ['both', 'on', 'off'], 'Patch n\' Pack runs of PPF.')
  cli.run(main)
