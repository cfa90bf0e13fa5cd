"""The one-command accelerator benchmark: ours vs the PyTorch reference, sampling and training.

On one device, in one process, for SiT, PPF-2 and PPF-3 at the same size, batch and precision:
  sampling  `vs_torch.run_benchmark`: Heun on the paper's grid spacing, the paper's per-stage CFG
            scales (`vs_torch.PAPER_CFG`), identical weights, noise and labels on both sides;
            ms per evaluation per stage, trajectory seconds, speed-ups vs SiT and FLOPs bounds;
  training  our train step (`bench.train`) unpacked and with Patch n' Pack, and the reference's
            eager step (per-stage buckets, MSE on the velocity, AdamW, bf16 autocast);
            images/s, TFLOP/s and MFU counted with the same FLOPs (`flops.training_flops`).
Writes one JSON and prints Markdown tables. The defaults (XL, batch 64, bf16, 25 Heun steps,
2 rounds, 3 x 3 train steps) are sized for a 10-minute window on one H100/H200 including XLA
compiles; `--config=bench:tiny` runs the same code end to end on a CPU in seconds
(tests/test_bench.py).

  python -m ppflow_jax.bench.suite --json=suite.json
  python -m ppflow_jax.bench.suite --config=bench:tiny --steps=4 --train_steps=1 --rounds=1 \
      --repeats=1 --json=/tmp/suite.json
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

from ppflow_jax import cli
from ppflow_jax import flops
from ppflow_jax import paths
from ppflow_jax import sampling
from ppflow_jax import stages as stages_lib
from ppflow_jax.bench import common
from ppflow_jax.bench import train as bench_train
from ppflow_jax.bench import vs_torch

# JAX and torch share the device: JAX allocates as it goes instead of taking 75% up front.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
PARTS = ('sample', 'train')
LEARNING_RATE = 1e-4  # the official trainer's AdamW (no weight decay); speed does not depend on it


def torch_train_benchmark(name: str, opts: dict, steps: int, torch, torch_model_cls,
                          seed: int = 0) -> dict:
  """The reference's train step: one forward per stage bucket, summed MSE, backward, AdamW."""
  config = common.make_config(name, opts)
  m, lat = config.model, config.latent
  schedule = stages_lib.from_config(config)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.manual_seed(seed)
  model = torch_model_cls(input_size=lat.height, patch_size=schedule.finest.patch[0],
                          in_channels=lat.channels, hidden_size=m.hidden_size, depth=m.depth,
                          num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                          num_classes=m.num_classes, learn_sigma=m.learn_sigma,
                          levels=len(schedule)).to(device).train()
  opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
  b = config.train.batch_size
  sizes = schedule.bucket_sizes(b)
  g = torch.Generator(device).manual_seed(seed)
  x1 = torch.randn(b, lat.channels, lat.height, lat.width, generator=g, device=device)
  y = torch.randint(0, m.num_classes, (b,), generator=g, device=device)
  autocast = config.model.dtype == 'bfloat16'

  def step():
    x0 = torch.randn(x1.shape, generator=g, device=device)
    loss, start = 0.0, 0
    for s, n in enumerate(sizes):
      st = schedule.stages[s]
      sl = slice(start, start + n)
      t = st.t_start + (st.t_end - st.t_start) * torch.rand(n, generator=g, device=device)
      tb = t[:, None, None, None]
      xt = tb * x1[sl] + (1 - tb) * x0[sl]
      with torch.autocast(device, torch.bfloat16, enabled=autocast):
        v = model(xt, t, y[sl], s)
      loss = loss + ((v.float() - (x1[sl] - x0[sl])) ** 2).mean() * n / b
      start += n
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  def sync():
    if device == 'cuda':
      torch.cuda.synchronize()

  start = time.perf_counter()
  step()
  sync()
  first = time.perf_counter() - start
  per_step = []
  for _ in range(opts['repeats']):
    start = time.perf_counter()
    for _ in range(steps):
      loss = step()
    sync()
    per_step.append((time.perf_counter() - start) / steps)
  if not np.isfinite(loss.item()):
    raise RuntimeError(f'{name}: the reference train step produced a non-finite loss')
  t = common.spread(per_step)
  step_flops = flops.training_flops(config, batch_size=b)['flops_per_image'] * b
  device_info = common.device_info()
  return dict(model=name, label=common.LABELS[name], bucket_sizes=list(sizes),
              seconds_per_step=t, images_per_second=b / t['median'],
              first_step_seconds=first, flops_per_step=step_flops,
              achieved_tflops=step_flops / t['median'] / 1e12,
              mfu=common.mfu(step_flops / t['median'], device_info))


def run_suite(opts: dict, spec: sampling.SamplerSpec, train_steps: int, torch,
              torch_model_cls, parts: tuple[str, ...] = PARTS) -> dict:
  """The `parts` of the suite; torch trains before JAX so its freed cache goes back first."""
  start = time.perf_counter()
  out = dict(benchmark='suite', torch=torch.__version__, options=common.as_json(opts))
  if 'sample' in parts:
    sample = vs_torch.run_benchmark(opts, spec, torch, torch_model_cls)
    out.update(sampler=sample['sampler'], sampling=sample['results'],
               sampling_acceptance=sample['acceptance'])
  if 'train' in parts:
    ref = []
    for n in opts['models']:
      ref.append(torch_train_benchmark(n, opts, train_steps, torch, torch_model_cls))
      if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for r in ref:
      r['speedup'] = r['images_per_second'] / ref[0]['images_per_second']
    ours = bench_train.run_benchmark(opts, train_steps, packings=(False, True),
                                     interleave=False)  # XL train states one at a time
    out.update(train_steps=train_steps, training=dict(jax=ours['results'], torch=ref))
  return dict(out, device=common.device_info(), wall_seconds=time.perf_counter() - start)


def training_table(result: dict) -> tuple[list[str], list[list[str]]]:
  headers = ['model', 'side', 'packing', 'images/s', 'step s (min-max)', 'speedup', 'TFLOP/s',
             'MFU']
  rows = []
  runs = ([('JAX', r) for r in result['training']['jax']]
          + [('torch', r) for r in result['training']['torch']])
  for side, r in runs:
    t = r['seconds_per_step']
    packing = {None: 'n/a', True: 'yes', False: 'no'}[r.get('packing')]
    rows.append([r['label'], side, packing, f"{r['images_per_second']:.3g}",
                 f"{t['median']:.3g} ({t['min']:.3g}-{t['max']:.3g})", f"{r['speedup']:.2f}x",
                 f"{r['achieved_tflops']:.3g}", common.fmt(r['mfu'], '.1%')])
  return headers, rows


def main(argv) -> None:
  f = flags.FLAGS
  opts, steps = common.command_line(argv)
  train_steps = f.train_steps
  if min(train_steps, f.rounds) < 1:
    raise app.UsageError(f'--train_steps={train_steps} and --rounds={f.rounds} must be >= 1')
  found = vs_torch.import_torch()
  if found is None:
    return
  if f.torch_threads:
    found[0].set_num_threads(f.torch_threads)
  opts.update(cfg_scale=1.0, paper_cfg=True, rounds=f.rounds)
  spec = sampling.SamplerSpec(method='heun', num_steps=steps + 1)
  unknown = set(f.parts) - set(PARTS)
  if unknown:
    raise app.UsageError(f'--parts: unknown {sorted(unknown)}; choose from {PARTS}')
  result = run_suite(opts, spec, train_steps, *found, parts=tuple(f.parts))
  dev = result['device']
  print(f"{dev['device_kind']} x{dev['device_count']}, jax {dev['jax']}, torch {result['torch']}: "
        f"{opts['size']}, batch {opts['batch']}, {opts['dtype']}, heun {steps} steps, paper CFG "
        f"{vs_torch.PAPER_CFG}, {result['wall_seconds']:.0f} s in all")
  if f.json:
    paths.write_text(f.json, json.dumps(result, indent=2))
  if 'sampling' in result:
    print(common.write_outputs(result, *vs_torch.table(dict(results=result['sampling'])),
                               json_path='', markdown=True))
  if 'training' in result:
    print(common.write_outputs(result, *training_table(result), json_path='', markdown=True))


if __name__ == '__main__':
  common.define_flags('bench:XL')
  flags.FLAGS.set_default('repeats', 3)
  flags.DEFINE_integer('steps', 25, 'Heun steps of the sampling comparison (grid = steps + 1).')
  flags.DEFINE_integer('rounds', 2, 'Alternating timed sampling rounds after the warm-up.')
  flags.DEFINE_integer('train_steps', 3, 'Train steps per timed repeat (x --repeats).')
  flags.DEFINE_list('parts', list(PARTS), f'Which of {PARTS} to run.')
  flags.DEFINE_integer('torch_threads', 0, 'torch.set_num_threads (0 = torch\'s default).')
  cli.run(main)
