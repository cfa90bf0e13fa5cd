"""Training benchmark: SiT vs PPF-2 vs PPF-3 train steps, with and without Patch n' Pack.

Same size, latent, global batch and precision for all models; random latents and labels (step
time does not depend on the data). Per run: images/s, real (unpadded) tokens/s, the speedup in
images/s over SiT next to its FLOPs bound (flops.training_flops: 3 x forward per image over the
stage buckets), achieved TFLOP/s and MFU, compile time (first step minus the steady median) and
peak device memory. Each repeat times `--steps` consecutive steps (the state is donated, as in
training); the warm-up step is excluded; medians and spreads are reported.

With the dense-mask `xla` attention (the CPU path) a packed row attends over its full length and
padding tokens are computed, so packed PPF runs are bounded by `packed_dense` FLOPs instead.

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
from ppflow_jax.train import Trainer


def bench_model(name: str, opts: dict, packing: bool, steps: int, seed: int = 0) -> dict:
  """Times `opts['repeats']` x `steps` train steps of model `name` after one warm-up step."""
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
    state = trainer.init_state(seed)
    jax.block_until_ready(state)
    start = time.perf_counter()
    state, metrics = trainer.step(state, batch)
    jax.block_until_ready((state, metrics))
    first = time.perf_counter() - start
    per_step = []
    for _ in range(opts['repeats']):
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = trainer.step(state, batch)
      jax.block_until_ready((state, metrics))
      per_step.append((time.perf_counter() - start) / steps)
  if not bool(jnp.isfinite(metrics['loss'])):
    raise RuntimeError(f'{name}: the benchmarked train step produced a non-finite loss')
  t = common.spread(per_step)
  tr = flops.training_flops(config)
  tokens = sum(n * trainer.schedule.num_tokens(s) for s, n in enumerate(trainer.bucket_sizes))
  step_flops = tr['flops_per_image'] * b
  device = common.device_info()
  multi = len(trainer.bucket_sizes) > 1
  return dict(model=name, label=common.LABELS[name], packing=packing if multi else None,
              bucket_sizes=list(trainer.bucket_sizes), seconds_per_step=t,
              images_per_second=b / t['median'], tokens_per_second=tokens / t['median'],
              tokens_per_step=tokens, compile_seconds=first - t['median'],
              flops_per_step=step_flops,
              packed_dense_flops_per_step=(tr.get('packed_dense_flops_per_image', 0) * b
                                           if packing and multi else None),
              achieved_tflops=step_flops / t['median'] / 1e12,
              mfu=common.mfu(step_flops / t['median'], device),
              peak_memory_bytes=common.peak_memory_bytes())


def run_benchmark(opts: dict, steps: int, packings: tuple[bool, ...] = (False, True)) -> dict:
  """Every model x packing (SiT once: one stage has nothing to pack); speedups vs the first."""
  results = []
  for name in opts['models']:
    for packing in (packings if common.MODELS[name] > 1 else packings[:1]):
      results.append(bench_model(name, opts, packing, steps))
  base = results[0]
  for r in results:
    r['speedup'] = r['images_per_second'] / base['images_per_second']
    r['speedup_flops_bound'] = base['flops_per_step'] / r['flops_per_step']
    r['speedup_vs_bound'] = r['speedup'] / r['speedup_flops_bound']
    dense = r['packed_dense_flops_per_step']
    r['speedup_packed_dense_bound'] = dense and base['flops_per_step'] / dense
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
    if r['speedup_packed_dense_bound']:
      bound += f" ({r['speedup_packed_dense_bound']:.2f}x dense mask)"
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
