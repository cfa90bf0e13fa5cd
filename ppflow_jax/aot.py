"""Ahead-of-time compilation for a TPU topology from any host: per-chip memory, FLOPs, collectives.

  python -m ppflow_jax.aot --config=configs/ppf_xl_2.py --topology=v5p:4x4x2 \
      [--batch=N] [--sample_batch=N] [--programs=train,sample] [--json] [--config.model.remat=full]
  python -m ppflow_jax.aot --config=configs/ppf_xl_2.py --topology=v5e:4x4 --search_batch

With `libtpu` installed (requirements-test.txt) JAX describes any TPU topology without its chips
(`jax.experimental.topologies`); the project's own `Trainer` train step and every sampler-stage
program are then lowered for those devices on the config's mesh (`config.mesh`) and compiled by
the real TPU compiler. Attention picks its kernels from the mesh's devices (ops/attention.py), so
the programs carry the Mosaic TPU kernels that would run on the pod.

Reported per program, per chip: the compiler's argument / output / aliased / temporary bytes and
their peak against the chip's HBM, the compiled program's matmul FLOPs (hlo.py: dots and
convolutions, loops counted by their trip counts) against `flops.py`'s analytic count (the
useful-FLOP fraction: below 1 where remat recomputes, above 1 where Mosaic kernels do the
attention, whose FLOPs the HLO does not show), collectives by kind with their bytes (hlo.py), the
Mosaic kernels, and the compile time on this host. XLA's cost analysis (`compiled_flops`,
`bytes_accessed`) does not multiply loop bodies by their trip counts, so for programs with model
loops (scanned blocks, sampler fori_loops) the memory term of the roofline is left out (None).
The roofline step time is an ESTIMATE: max(analytic FLOPs /
peak bf16 FLOP/s, bytes accessed / HBM bandwidth) with the chips' published peaks (CHIPS). Exits
with status 2 and one line when a program does not fit the chip's HBM. `--search_batch` instead
finds the largest per-chip train batch that fits (`largest_fitting`: a few compiles).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import app
from absl import flags
from ml_collections import config_flags

from ppflow_jax import config_lib
from ppflow_jax import flops as flops_lib
from ppflow_jax import hlo
from ppflow_jax import inference
from ppflow_jax import paths
from ppflow_jax import sharding
from ppflow_jax import train

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip specs (cloud.google.com/tpu/docs/system-architecture-tpu-vm)."""
  hbm_gib: float
  peak_bf16_tflops: float
  hbm_gbytes_per_s: float


CHIPS = {
    'v4': Chip(32, 275, 1228),
    'v5e': Chip(16, 197, 819),
    'v5p': Chip(95, 459, 2765),
    'v6e': Chip(32, 918, 1640),
}
PROGRAMS = ('train', 'sample')


class DoesNotFit(Exception):
  """A program needs more HBM per chip than the chip has (the message is one line)."""


# -- topology ------------------------------------------------------------------------------------


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
  """'v5p:4x4x2' -> ('v5p', (4, 4, 2)); one clear error for anything else."""
  m = re.fullmatch(r'(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})', name)
  if not m:
    raise ValueError(f'--topology={name!r} must look like v5e:4x4, v6e:4x4, v5p:4x4x2 or v4:2x2x4 '
                     f'(chip generation one of {sorted(CHIPS)})')
  return m.group(1), tuple(int(x) for x in m.group(2).split('x'))


def topology_devices(name: str, num_slices: int = 1) -> list:
  """TPU device descriptions of topology `name` (no chips needed; libtpu must be installed)."""
  parse_topology(name)
  # libtpu reads these when its plugin loads: no TPU VM metadata to query, and several compile-only
  # processes may share one host.
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = dict(num_slices=num_slices) if num_slices > 1 else {}
  if parse_topology(name)[0] == 'v4':
    # One device per chip (megacore), as JAX runs a v4 pod; the description defaults to cores.
    kwargs['chip_config_name'] = 'megacore'
  try:
    return list(topologies.get_topology_desc(topology_name=name, platform='tpu', **kwargs).devices)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f'cannot describe TPU topology {name!r} ({str(e).splitlines()[0]}); '
                       'is libtpu installed (pip install -r requirements-test.txt)?') from e


# -- one compiled program -----------------------------------------------------------------------


def _sds(tree, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      tree, shardings)


def write_hlo(hlo_dir: str, program: str, text: str) -> str:
  """Writes a program's compiled HLO text to `hlo_dir` (a local path or a URL) -> its name."""
  path = paths.join(paths.makedirs(hlo_dir), program.replace('/', '_') + '.hlo.txt')
  paths.write_text(path, text)
  return path


def _measure(name: str, lower, chip: Chip, analytic: float, loops: bool,
             hlo_dir: str | None = None) -> dict:
  """Lowers and compiles, then reads memory, cost and HLO statistics (per chip)."""
  t0, c0 = time.perf_counter(), time.process_time()
  lowered = lower()
  t1, c1 = time.perf_counter(), time.process_time()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if 'RESOURCE_EXHAUSTED' in text or 'Ran out of memory' in text:
      raise DoesNotFit(f'{name}: the TPU compiler ran out of HBM '
                       f'({text.strip().splitlines()[0][:300]})') from e
    raise
  t2, c2 = time.perf_counter(), time.process_time()
  mem = compiled.memory_analysis()
  memory = dict(argument=mem.argument_size_in_bytes, output=mem.output_size_in_bytes,
                alias=mem.alias_size_in_bytes, temp=mem.temp_size_in_bytes,
                generated_code=mem.generated_code_size_in_bytes)
  # Donated (aliased) outputs reuse their argument buffers.
  memory['peak'] = (memory['argument'] + memory['output'] - memory['alias'] + memory['temp']
                    + memory['generated_code'])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  text = compiled.as_text()
  if hlo_dir:
    write_hlo(hlo_dir, name, text)
  stats = hlo.analyze(text)
  compiled_flops = float(cost.get('flops', 0.0))
  bytes_accessed = float(cost.get('bytes accessed', 0.0))
  compute_s = analytic / (chip.peak_bf16_tflops * 1e12)
  memory_s = None if loops else bytes_accessed / (chip.hbm_gbytes_per_s * 1e9)
  return dict(
      # Wall seconds, and CPU seconds of this process (all threads): on a shared host the CPU
      # seconds are the comparable measure.
      program=name, lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2),
      lower_cpu_s=round(c1 - c0, 2), compile_cpu_s=round(c2 - c1, 2),
      memory_bytes=memory, peak_gib=memory['peak'] / GIB, hbm_gib=chip.hbm_gib,
      fits=memory['peak'] <= chip.hbm_gib * GIB,
      compiled_flops=compiled_flops, analytic_flops=analytic, cost_counts_loops_once=loops,
      matmul_flops=stats.matmul_flops,
      useful_flop_fraction=analytic / stats.matmul_flops if stats.matmul_flops else None,
      bytes_accessed=bytes_accessed,
      collectives={k: dict(count=v['count'], bytes=v['bytes'], gib=v['bytes'] / GIB)
                   for k, v in stats.collectives.items()},
      collective_gib=sum(v['bytes'] for v in stats.collectives.values()) / GIB,
      mosaic_kernels=stats.mosaic_kernels, mosaic_calls=stats.mosaic_calls,
      unknown_trip_counts=stats.unknown_trip_counts,
      roofline_estimate=dict(compute_s=compute_s, memory_s=memory_s,
                             step_s=max(compute_s, memory_s or 0.0),
                             bound='compute' if memory_s is None or compute_s >= memory_s
                             else 'memory'))


def compile_train(trainer: train.Trainer, chip: Chip, chips: int, hlo_dir: str | None = None
                  ) -> dict:
  """The sharded train step (params, EMA, Adam state donated) at trainer's global batch."""
  config = trainer.config
  batch = config.train.batch_size
  state = _sds(jax.eval_shape(trainer.init_state), trainer.state_sharding)
  h, w, c = config.latent.height, config.latent.width, config.latent.channels
  data = {'x': jax.ShapeDtypeStruct((batch, h, w, c), jnp.float32,
                                    sharding=trainer.batch_sharding['x']),
          'y': jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=trainer.batch_sharding['y'])}
  analytic = flops_lib.training_flops(config, batch)['flops_per_image'] * batch / chips
  with jax.set_mesh(trainer.mesh):
    return _measure('train', lambda: trainer.step.lower(state, data), chip, analytic,
                    config.model.scan_blocks, hlo_dir)


def compile_sampler(trainer: train.Trainer, chip: Chip, chips: int, batch: int,
                    hlo_dir: str | None = None) -> list[dict]:
  """Every sampler-segment program (one per stage, CFG included) on `batch` images."""
  config, mesh = trainer.config, trainer.mesh
  params = _sds(jax.eval_shape(trainer.init_state).ema, trainer.state_sharding.params)
  sampler = inference.Inference.from_trainer(trainer, params).sampler()
  spec = sampler.spec
  h, w, c = config.latent.height, config.latent.width, config.latent.channels
  rows = sharding.batch_sharding(mesh, 1)
  noise = jax.ShapeDtypeStruct((batch, h, w, c), jnp.float32,
                               sharding=sharding.batch_sharding(mesh, 4))
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
  keys = jax.ShapeDtypeStruct((batch,), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                              sharding=rows)
  per_step = 2 if spec.method == 'heun' else 1
  out = []
  for i, seg in enumerate(sampler.segments):
    fwd = flops_lib.forward_flops(config, seg.stage)['flops']
    passes = (2 if seg.guided else 1) * batch / chips
    steps = seg.stop - seg.start
    extra = seg.finish_pending + seg.begin_crossing
    analytic = (per_step * steps + extra) * fwd * passes
    name = f'sample/segment{i}_stage{seg.stage}'
    with jax.set_mesh(mesh):
      row = _measure(name, lambda seg=seg: sampler.lower(params, noise, labels, keys, seg,
                                                         sharding.replicated(mesh)),
                     chip, analytic, steps > 1 or config.model.scan_blocks, hlo_dir)
    row.update(stage=seg.stage, tokens=trainer.schedule.num_tokens(seg.stage), steps=steps,
               guided=seg.guided, batch=batch)
    out.append(row)
  return out


def run(config: ml_collections.ConfigDict, topology: str, programs=PROGRAMS,
        batch: int | None = None, sample_batch: int | None = None, num_slices: int = 1,
        hlo_dir: str | None = None, hbm_gib: float | None = None) -> dict:
  """Compiles `programs` of `config` for `topology`; returns the report (see module docstring).

  batch: global train batch (default config.train.batch_size); sample_batch: sampler batch
  (default: the train batch); hlo_dir: also write each program's compiled HLO text there;
  hbm_gib: the HBM per chip a program may use (default: the chip's), e.g. to keep headroom.
  """
  unknown = set(programs) - set(PROGRAMS)
  if unknown:
    raise ValueError(f'--programs: {sorted(unknown)} not among {list(PROGRAMS)}')
  config = config_lib.resolve(config)
  if batch:
    config.train.batch_size = batch
  generation, _ = parse_topology(topology)
  chip = CHIPS[generation]
  if hbm_gib:
    chip = dataclasses.replace(chip, hbm_gib=hbm_gib)
  devices = topology_devices(topology, num_slices)
  mesh = sharding.make_mesh(config, devices)
  trainer = train.Trainer(config, mesh)
  report = dict(topology=topology, num_slices=num_slices, chips=len(devices),
                device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
                model=dict(size=config.model.size, depth=config.model.depth,
                           stages=[list(p) for p in config.schedule.patch_sizes],
                           dtype=config.model.dtype, scan_blocks=config.model.scan_blocks,
                           remat=config.model.remat, attention=config.model.attention),
                batch=config.train.batch_size, chip=dataclasses.asdict(chip),
                jax=jax.__version__, programs=[])
  if 'train' in programs:
    report['programs'].append(compile_train(trainer, chip, len(devices), hlo_dir))
  if 'sample' in programs:
    report['programs'] += compile_sampler(trainer, chip, len(devices),
                                          sample_batch or config.train.batch_size, hlo_dir)
  return report


# -- the largest batch that fits -----------------------------------------------------------------


def largest_fitting(peak_gib: Callable[[int], float | None], hbm_gib: float, start: int = 4,
                    limit: int = 4096, max_trials: int = 16) -> tuple[int, list[dict]]:
  """The largest n in [1, limit] with peak_gib(n) <= hbm_gib, and the trials that found it.

  peak_gib(n) is a compile (minutes at XL), None when the compiler itself ran out of memory.
  Peak memory grows almost linearly with the batch, so after two measured sizes the next one is
  where a line meets the HBM, between the largest size that fits and the smallest that does not:
  the least-squares line through all measured peaks until a size over the budget has been
  measured, then the secant through the largest fitting size and the smallest failing one (memory
  grows slightly faster than linearly at XL, so the far-reaching line overshoots and the secant
  closes in). The search ends when those two sizes are adjacent (typically four to seven
  compiles). Where the line misleads, it steps up from the largest fitting size (nothing failed
  yet) or bisects.
  """
  lo, hi, trials, n = 0, limit + 1, [], min(start, limit)
  while hi - lo > 1 and len(trials) < max_trials:
    peak = peak_gib(n)
    fits = peak is not None and peak <= hbm_gib
    trials.append(dict(n=n, peak_gib=peak, fits=fits))
    lo, hi = (max(lo, n), hi) if fits else (lo, min(hi, n))
    known = [(t['n'], t['peak_gib']) for t in trials if t['peak_gib'] is not None]
    peaks = dict(known)
    if lo in peaks and hi in peaks:  # the secant across the budget
      known = [(lo, peaks[lo]), (hi, peaks[hi])]
    if len(known) >= 2:  # sizes are never tried twice
      xs, ys = zip(*known)
      mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
      slope = sum((x - mx) * (y - my) for x, y in known) / sum((x - mx) ** 2 for x in xs)
      guess = mx + (hbm_gib - my) / slope if slope > 0 else 2.0 * lo
    else:
      guess = 2.0 * n if fits else n / 2
    # Bisect where the line contradicts a measurement (the compiler ran out of memory before the
    # line says, memory jumps) or after two failures in a row. A line below the largest fitting
    # size before anything failed means that size's peak is already about at the budget (peaks
    # are not exactly monotonic): the next size up is the one to try, not the middle of
    # [lo, limit], where the compiler runs out of memory without a peak to fit.
    contradicts = guess < lo or (hi <= limit and guess >= hi)
    twice = len(trials) > 1 and not (trials[-1]['fits'] or trials[-2]['fits'])
    if guess < lo and hi > limit:
      n = lo + 1
    elif contradicts or twice:
      n = (lo + hi) // 2
    else:
      n = min(max(int(guess), lo + 1), hi - 1)
  return lo, trials


def search_batch(config: ml_collections.ConfigDict, topology: str, num_slices: int = 1,
                 hbm_gib: float | None = None, start: int = 4) -> dict:
  """The largest per-chip train batch of `config` that fits the topology's HBM (train step only).

  The global batch is the per-chip batch times the batch shards of the config's mesh (data x fsdp).
  """
  config = config_lib.resolve(config)
  shards = sharding.batch_shards(sharding.make_mesh(config, topology_devices(topology, num_slices)))
  hbm = hbm_gib or CHIPS[parse_topology(topology)[0]].hbm_gib
  reports = {}

  def peak(per_chip: int) -> float | None:
    try:
      reports[per_chip] = run(config, topology, ('train',), per_chip * shards,
                              num_slices=num_slices, hbm_gib=hbm)
    except DoesNotFit:
      return None
    return reports[per_chip]['programs'][0]['peak_gib']

  best, trials = largest_fitting(peak, hbm, start)
  tried = {t['n']: t['fits'] for t in trials}
  # Confirmed: the size above the answer was compiled and did not fit (or the answer is 0).
  confirmed = best == 0 or tried.get(best + 1) is False
  for t in trials:
    t.update(global_batch=t['n'] * shards,
             compile_s=reports[t['n']]['programs'][0]['compile_s'] if t['n'] in reports else None)
  return dict(topology=topology, num_slices=num_slices, hbm_gib=hbm, batch_shards=shards,
              remat=config.model.remat, scan_blocks=config.model.scan_blocks,
              largest_per_chip=best, largest_global_batch=best * shards, confirmed=confirmed,
              trials=trials,
              report=reports.get(best))


def format_search(result: dict) -> str:
  lines = [f"largest train batch that fits {result['hbm_gib']:g} GiB per chip on "
           f"{result['topology']} (scan={result['scan_blocks']}, remat={result['remat']}): "
           f"{result['largest_per_chip']} per chip = global {result['largest_global_batch']}"
           + ('' if result['confirmed'] else ' (the search stopped before the next size failed)')]
  for t in result['trials']:
    peak = 'compiler OOM' if t['peak_gib'] is None else f"{t['peak_gib']:.2f} GiB"
    lines.append(f"  per chip {t['n']:>5} (global {t['global_batch']:>6}): {peak:>12}  "
                 f"{'fits' if t['fits'] else 'does not fit'}")
  return '\n'.join(lines)


def check_fits(report: dict) -> None:
  """Raises DoesNotFit (one line) naming the first program over the chip's HBM."""
  for p in report['programs']:
    if not p['fits']:
      raise DoesNotFit(
          f"{p['program']} needs {p['peak_gib']:.2f} GiB per chip, more than the "
          f"{p['hbm_gib']:g} GiB of {report['device_kind']} ({report['topology']}, batch "
          f"{report['batch']}, remat={report['model']['remat']}); try "
          '--config.model.remat=full, --config.model.scan_blocks=True, a smaller --batch or more '
          'fsdp (--config.mesh.fsdp)')


def format_report(report: dict) -> str:
  """A fixed-width table of `report` (what --json prints as JSON)."""
  m = report['model']
  lines = [f"{report['topology']} x{report['num_slices']} ({report['chips']} chips, "
           f"{report['device_kind']}), mesh {report['mesh']}, batch {report['batch']}, "
           f"{m['size']} stages {m['stages']} {m['dtype']} scan={m['scan_blocks']} "
           f"remat={m['remat']}",
           f"{'program':<24}{'peak GiB':>9}{'HBM':>5}{'fits':>5}{'temp GiB':>9}{'arg GiB':>8}"
           f"{'TFLOP':>8}{'useful':>7}{'coll GiB':>9}{'mosaic':>7}{'compile s':>10}{'cpu s':>7}"
           f"{'est. ms':>8}"]
  for p in report['programs']:
    mem = p['memory_bytes']
    useful = p['useful_flop_fraction']
    lines.append(
        f"{p['program']:<24}{p['peak_gib']:>9.2f}{p['hbm_gib']:>5g}{'yes' if p['fits'] else 'NO':>5}"
        f"{mem['temp'] / GIB:>9.2f}{mem['argument'] / GIB:>8.2f}{p['analytic_flops'] / 1e12:>8.3f}"
        f"{'-' if useful is None else f'{useful:.2f}':>7}{p['collective_gib']:>9.3f}"
        f"{p['mosaic_kernels']:>7}{p['lower_s'] + p['compile_s']:>10.1f}"
        f"{p['lower_cpu_s'] + p['compile_cpu_s']:>7.0f}"
        f"{p['roofline_estimate']['step_s'] * 1e3:>8.1f}")
    for kind, c in p['collectives'].items():
      lines.append(f"    {kind:<20}{c['count']:>8.0f} x  {c['gib']:.3f} GiB")
  lines.append('TFLOP: analytic per chip per call; useful: analytic / compiled matmul FLOPs '
               '(Mosaic kernels not counted); compile s: wall (cpu s: CPU) to lower and compile on this '
               'host; est. ms: roofline ESTIMATE (see module docstring).')
  return '\n'.join(lines)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  if f.search_batch:
    result = search_batch(f.config, f.topology, f.num_slices, f.hbm_gib or None)
    print(json.dumps(result, indent=1) if f.json else format_search(result))
    if not result['largest_per_chip']:
      print('does not fit: not even one image per chip fits; try --config.model.remat=full, '
            '--config.model.scan_blocks=True or more fsdp (--config.mesh.fsdp)', file=sys.stderr)
      sys.exit(2)
    return
  try:
    report = run(f.config, f.topology, tuple(f.programs), f.batch or None, f.sample_batch or None,
                 f.num_slices, f.hlo_dir or None, f.hbm_gib or None)
    print(json.dumps(report, indent=1) if f.json else format_report(report))
    check_fits(report)
  except DoesNotFit as e:
    print(f'does not fit: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile only: never claim this host's chips.
  # Flags are defined only when run as a script (main.py defines its own --config).
  config_flags.DEFINE_config_file('config', None, 'Config file (get_config()).', lock_config=True)
  flags.DEFINE_string('topology', 'v5e:2x2', 'TPU topology, e.g. v5e:4x4, v5p:4x4x2.')
  flags.DEFINE_integer('num_slices', 1, 'Slices of that topology (multi-slice).')
  flags.DEFINE_integer('batch', 0, 'Global train batch (0: config.train.batch_size).')
  flags.DEFINE_integer('sample_batch', 0, 'Sampler batch (0: the train batch).')
  flags.DEFINE_list('programs', list(PROGRAMS), 'Which programs to compile.')
  flags.DEFINE_bool('json', False, 'Print the report as JSON.')
  flags.DEFINE_string('hlo_dir', '', 'Also write each compiled program as HLO text there.')
  flags.DEFINE_float('hbm_gib', 0, 'HBM per chip a program may use (0: the chip\'s).')
  flags.DEFINE_bool('search_batch', False, 'Find the largest per-chip train batch that fits '
                    '(a few train-step compiles); ignores --batch and --programs.')
  flags.mark_flags_as_required(['config'])
  app.run(main)
