"""The TPU AOT benchmark behind docs/tpu_aot.md: compile rows with ppflow_jax.aot, keep their JSON.

  python -m ppflow_jax.bench.aot --rows=ppf_xl_2_v5e16_b256_unrolled,ppf_xl_2_v5e16_b256_scan_full
  python -m ppflow_jax.bench.aot --grid --jobs=2  # every model x topology x batch cell not yet run
  python -m ppflow_jax.bench.aot --markdown       # the docs tables from docs/tpu_aot/*.json

Each row is one `python -m ppflow_jax.aot` run (bf16 compute; train steps with parameters and
optimizer state fully sharded: mesh data=1, fsdp=all chips; sampler programs data-parallel with
whole weights on every chip, the default mesh) whose JSON report, plus the exact command, lands in
docs/tpu_aot/<row>.json. Compile times are measured, not asserted: the wall and CPU seconds of the
TPU compiler on the host that ran the row (the JSON says which). A row that does not fit is
recorded with the compiler's verdict. Rows run one process each, so their compile times do not
share caches.

The grid (docs/tpu_aot.md's topology x batch table) is, for every model, topology and global batch
in GRID_BATCHES, the scanned train step without remat, and where that does not fit, with full
remat: the cheapest policy that fits.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import platform
import re
import subprocess
import sys

from absl import app
from absl import flags

OUT = os.path.join(os.path.dirname(__file__), '..', '..', 'docs', 'tpu_aot')
CONFIGS = {'sit_xl_2': 'configs/sit_xl_2.py', 'ppf_xl_2': 'configs/ppf_xl_2.py',
           'ppf_xl_3': 'configs/ppf_xl_3.py'}
TOPOLOGIES = {'v5e16': 'v5e:4x4', 'v5e64': 'v5e:8x8', 'v5p32': 'v5p:2x4x2', 'v5p128': 'v5p:4x4x4',
              'v6e16': 'v6e:4x4', 'v432': 'v4:2x2x4'}
REMAT = {'unrolled': ('False', 'none'), 'scan_none': ('True', 'none'),
         'scan_dots': ('True', 'dots'), 'scan_full': ('True', 'full')}
GRID_BATCHES = (256, 1024)
GRID_POLICIES = ('scan_none', 'scan_full')   # cheapest first
DOES_NOT_FIT = 2                              # ppflow_jax.aot's exit status


def row_command(name: str) -> list[str]:
  """'<model>_<topology>_b<batch>_<layout>[_s]' -> the aot command line.

  e.g. ppf_xl_2_v5e16_b256_scan_full = PPF-XL-2, v5e:4x4, global batch 256, scanned blocks with
  full remat, train step; `_s`: the sampler-stage programs at that batch instead (remat does not
  apply to them); `bmax` instead of `b<N>` searches the largest train batch that fits.
  """
  parts = name.split('_')
  sample = parts[-1] == 's'
  parts = parts[:-1] if sample else parts
  layout = '_'.join(parts[-2:]) if parts[-2] == 'scan' else parts[-1]
  rest = parts[:-2] if parts[-2] == 'scan' else parts[:-1]
  model, topology, batch = '_'.join(rest[:-2]), rest[-2], rest[-1]
  search = batch == 'bmax'
  if (model not in CONFIGS or topology not in TOPOLOGIES or layout not in REMAT
      or not (search or re.fullmatch(r'b\d+', batch)) or (search and sample)):
    raise ValueError(f'row {name!r} must be <{"|".join(CONFIGS)}>_<{"|".join(TOPOLOGIES)}>_'
                     f'<b<N>|bmax>_<{"|".join(REMAT)}>[_s] (no _s with bmax)')
  scan, remat = REMAT[layout]
  what = (['--search_batch'] if search else
          [f'--batch={batch[1:]}', f'--programs={"sample" if sample else "train"}'])
  # Training shards parameters and optimizer state over every chip (fsdp); sampling keeps the
  # weights whole on each chip and splits the batch (the default mesh, as sample.py runs it).
  mesh = ('--config.mesh.data=-1', '--config.mesh.fsdp=1') if sample else (
      '--config.mesh.data=1', '--config.mesh.fsdp=-1')
  return [sys.executable, '-m', 'ppflow_jax.aot', f'--config={CONFIGS[model]}',
          f'--topology={TOPOLOGIES[topology]}', *what, '--json',
          '--config.model.dtype=bfloat16', *mesh,
          f'--config.model.scan_blocks={scan}', f'--config.model.remat={remat}']


def run_row(name: str) -> dict:
  cmd = row_command(name)
  proc = subprocess.run(cmd, capture_output=True, text=True,
                        cwd=os.path.join(os.path.dirname(__file__), '..', '..'),
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  result = dict(row=name, command=' '.join(['python'] + cmd[1:]), host=platform.node(),
                host_cpus=os.cpu_count(), returncode=proc.returncode)
  if proc.returncode == 0 or proc.stdout.strip().startswith('{'):
    result['report'] = json.loads(proc.stdout)
  if proc.returncode:
    result['error'] = (proc.stderr.strip().splitlines() or ['?'])[-1]
  return result


def save(result: dict) -> None:
  with open(os.path.join(OUT, f"{result['row']}.json"), 'w') as fh:
    json.dump(result, fh, indent=1)
  print(result['row'], 'ok' if result['returncode'] == 0 else result.get('error'), flush=True)


def grid_cells() -> list[tuple[str, str, int]]:
  return [(m, t, b) for m in CONFIGS for t in TOPOLOGIES for b in GRID_BATCHES]


def cell_rows(model: str, topology: str, batch: int) -> list[str]:
  """The row names of one grid cell, cheapest policy first."""
  return [f'{model}_{topology}_b{batch}_{layout}' for layout in GRID_POLICIES]


def run_cell(model: str, topology: str, batch: int) -> None:
  """The cell's rows, cheapest policy first, until one fits; cells already run are skipped."""
  for name in cell_rows(model, topology, batch):
    path = os.path.join(OUT, f'{name}.json')
    result = json.load(open(path)) if os.path.exists(path) else None
    if result is None:
      result = run_row(name)
      save(result)
    if result['returncode'] != DOES_NOT_FIT:
      return


def grid_markdown(results: list[dict]) -> str:
  """One line per grid cell: the cheapest policy that fits (or the last one tried)."""
  by_row = {r['row']: r for r in results}
  lines = ['| model | topology | chips | global batch | per chip | remat that fits | '
           'peak GiB/chip | HBM | useful FLOP | collectives GiB/chip | Mosaic calls | '
           'compile CPU s | roofline est. ms |', '|---' * 13 + '|']
  for model, topology, batch in grid_cells():
    tried = [by_row[n] for n in cell_rows(model, topology, batch) if n in by_row]
    if not tried:
      continue
    fitting = [r for r in tried if r['returncode'] == 0]
    r = (fitting or tried)[0]
    head = f"| {model} | {TOPOLOGIES[topology]} | "
    if 'report' not in r:
      lines.append(head + f"| {batch} | | none fits ({r.get('error', '')[:80]}) | | | | | | | |")
      continue
    rep = r['report']
    p = rep['programs'][0]
    lines.append(
        head + f"{rep['chips']} | {batch} | {batch // rep['chips']} | "
        f"{rep['model']['remat'] if fitting else 'none fits'} | {p['peak_gib']:.2f} | "
        f"{p['hbm_gib']:g} | {_fraction(p)} | {p['collective_gib']:.2f} | {p['mosaic_calls']} | "
        f"{p['lower_cpu_s'] + p['compile_cpu_s']:.0f} | "
        f"{p['roofline_estimate']['step_s'] * 1e3:.0f} ({p['roofline_estimate']['bound']}) |")
  return '\n'.join(lines)


def _fraction(program: dict) -> str:
  useful = program['useful_flop_fraction']
  return '-' if useful is None else f'{useful:.2f}'


def search_markdown(results: list[dict]) -> str:
  """One table row per batch search (`bmax` rows)."""
  lines = ['| row | chips | remat | scan | largest batch per chip | global batch | peak GiB/chip | '
           'HBM | next size fails | compiles | compile s (CPU s) at the largest |',
           '|---' * 11 + '|']
  for r in sorted(results, key=lambda r: r['row']):
    s = r.get('report')
    if s is None:
      lines.append(f"| {r['row']} | | | | no: {r.get('error', '')[:120]} | | | | | | |")
      continue
    p = s['report']['programs'][0] if s['report'] else None
    peak = '-' if p is None else f"{p['peak_gib']:.2f}"
    lines.append(
        f"| {r['row']} | {s['batch_shards']} | {s['remat']} | {s['scan_blocks']} | "
        f"{s['largest_per_chip']} | {s['largest_global_batch']} | "
        f"{peak} | {s['hbm_gib']:g} | "
        f"{'yes' if s['confirmed'] else 'not compiled'} | {len(s['trials'])} | "
        + ('- |' if p is None else f"{p['lower_s'] + p['compile_s']:.0f} "
           f"({p['lower_cpu_s'] + p['compile_cpu_s']:.0f}) |"))
  return '\n'.join(lines)


def markdown(results: list[dict]) -> str:
  """One table row per train program, one per sampler program; the batch searches; the grid."""
  searches = [r for r in results if '_bmax_' in r['row']]
  grid = grid_markdown(results)
  grid_rows = {n for cell in grid_cells() for n in cell_rows(*cell)}
  results = [r for r in results if r not in searches and r['row'] not in grid_rows]
  head = ('| row | chips | batch | remat | scan | peak GiB/chip | HBM | fits | useful FLOP | '
          'collectives GiB/chip | Mosaic | compile s (CPU s) | roofline est. ms |\n' + '|---' * 13
          + '|')
  lines = [head]
  for r in sorted(results, key=lambda r: r['row']):
    rep = r.get('report')
    if rep is None:
      lines.append(f"| {r['row']} | | | | | | | no: {r.get('error', '')[:120]} | | | | | |")
      continue
    for p in rep['programs']:
      lines.append(
          f"| {r['row']} {p['program']} | {rep['chips']} | {p.get('batch', rep['batch'])} | "
          f"{rep['model']['remat']} | {rep['model']['scan_blocks']} | {p['peak_gib']:.2f} | "
          f"{p['hbm_gib']:g} | {'yes' if p['fits'] else 'no'} | "
          f"{_fraction(p)} | {p['collective_gib']:.2f} | "
          f"{p['mosaic_kernels']} | {p['lower_s'] + p['compile_s']:.0f} "
          f"({p['lower_cpu_s'] + p['compile_cpu_s']:.0f}) | "
          f"{p['roofline_estimate']['step_s'] * 1e3:.0f} ({p['roofline_estimate']['bound']}) |")
  if searches:
    lines += ['', search_markdown(searches)]
  if grid.count('\n') > 1:
    lines += ['', grid]
  return '\n'.join(lines)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  os.makedirs(OUT, exist_ok=True)
  with concurrent.futures.ThreadPoolExecutor(f.jobs) as pool:  # each row is its own process
    jobs = [pool.submit(lambda n: save(run_row(n)), name) for name in f.rows]
    if f.grid:
      jobs += [pool.submit(run_cell, *cell) for cell in grid_cells()]
    for job in jobs:
      job.result()
  if f.markdown:
    results = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(OUT, '*.json')))]
    print(markdown(results))   # docs/tpu_aot.md's block: python -m ppflow_jax.tables


if __name__ == '__main__':
  flags.DEFINE_list('rows', [], 'Rows to compile (see row_command for the naming).')
  flags.DEFINE_bool('grid', False, 'Compile every grid cell (model x topology x batch) that has '
                    'no JSON yet, cheapest remat first (see the module docstring).')
  flags.DEFINE_integer('jobs', 1, 'Rows compiled at the same time (one process each).')
  flags.DEFINE_bool('markdown', False, 'Print the docs tables from docs/tpu_aot/*.json.')
  app.run(main)
