"""What the sampling and training benchmarks share: the compared models, their config and flags,
device facts (peak FLOP/s, memory), robust timing statistics and the output writers.

Every benchmark compares SiT (one stage, 2x2 patches) with PPF-2 and PPF-3 at the size, latent,
batch and precision of one config (configs/bench.py, `--config=bench:XL`), with freshly
initialised weights: run time does not depend on the weight values (no data-dependent control
flow; XLA does not skip zeros), so no checkpoint is needed.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
from typing import Callable, TypeVar

import jax
import ml_collections
from absl import app
from absl import flags
from ml_collections import config_flags

from ppflow_jax import config_lib
from ppflow_jax import errors
from ppflow_jax import paths

T = TypeVar('T')

# Dense bf16 peak FLOP/s per chip, matched in order against `device.device_kind` (the TPU v5e
# and v6e report themselves as "TPU v5 lite" / "TPU v6 lite", the v5p as "TPU v5").
PEAK_BF16_FLOPS = (
    ('H100', 989e12), ('H200', 989e12), ('A100', 312e12),
    ('TPU v4', 275e12), ('TPU v5 lite', 197e12), ('TPU v5e', 197e12), ('TPU v5p', 459e12),
    ('TPU v5', 459e12), ('TPU v6 lite', 918e12), ('TPU v6e', 918e12),
)

# name -> number of stages and name -> label, from config_lib's one table (CFG scales per run).
MODELS = {name: stages for name, (_, stages) in config_lib.PAPER_MODELS.items()}
LABELS = {name: label for name, (label, _) in config_lib.PAPER_MODELS.items()}


def define_flags(config: str = 'bench') -> None:
  """The flags every benchmark shares (call once, before absl parses argv): `--config`, by
  default configs/bench.py (`bench:XL`, `bench:tiny`, ...; overrides with --config.x=y), and
  which models to run, how often, and where the results go."""
  config_flags.DEFINE_config_file(
      'config', config_lib.find_config(config), 'Benchmark config (configs/bench.py:S|B|L|XL|'
      'tiny): the size, latent, batch and precision every compared model shares.',
      lock_config=True)
  flags.DEFINE_list('models', list(MODELS), f'Which of {list(MODELS)} to run, in order.')
  flags.DEFINE_integer('repeats', 5, 'Timed repeats after the warm-up (median and spread).')
  flags.DEFINE_string('json', '', 'Write the results as JSON to this file.')
  flags.DEFINE_bool('markdown', False, 'Print a Markdown table instead of plain text.')


def command_line(argv) -> tuple[dict, int]:
  """A benchmark's parsed command line: (options, --steps)."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  if f.steps < 1:
    raise app.UsageError(f'--steps={f.steps} must be >= 1')
  return options(f.config, f.models, f.repeats), f.steps


def print_result(result: dict, headers: list[str], rows: list[list[str]], settings: str) -> None:
  """Prints the device line with `settings`, then the table (and writes --json if given)."""
  dev, f = result['device'], flags.FLAGS
  print(f"{dev['device_kind']} x{dev['device_count']}, jax {dev['jax']}: "
        f"{result['options']['size']}, {settings}")
  print(write_outputs(result, headers, rows, json_path=f.json, markdown=f.markdown))


def define_part_flags(rounds: int, calls: int) -> None:
  """The flags of the part benchmarks (bench.attention, bench.block): SiT/PPF-S sizes at a
  CFG-doubled batch, interleaved rounds, outputs."""
  flags.DEFINE_integer('batch', 16, 'Rows (a CFG-doubled batch of 8 images).')
  flags.DEFINE_integer('heads', 6, 'Heads (S: 6).')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
  flags.DEFINE_integer('rounds', rounds, 'Interleaved rounds.')
  flags.DEFINE_integer('calls', calls, 'Timed calls per run per round.')
  flags.DEFINE_string('json', '', 'Write the results as JSON to this file.')
  flags.DEFINE_bool('markdown', False, 'Print a Markdown table.')


def report(benchmark: str, opts: dict, results: list[dict], table, settings: str) -> None:
  """Prints a part benchmark's device line with `settings` and its `table(result)`; writes --json
  (flags of `define_part_flags`)."""
  result = dict(benchmark=benchmark, device=device_info(), options=opts, results=results)
  print(f"{result['device']['device_kind']}, jax {result['device']['jax']}: {settings}")
  f = flags.FLAGS
  print(write_outputs(result, *table(result), json_path=f.json, markdown=f.markdown))


def options(config: ml_collections.ConfigDict, models, repeats: int, **more) -> dict:
  """What a benchmark run compares: the shared `config` (resolved, locked) under 'config', the
  models in order, timed repeats and `more`; also size, batch and dtype, for the result JSON."""
  config = config_lib.resolve(copy.deepcopy(config))
  config.lock()
  models = list(models)
  unknown = [m for m in models if m not in MODELS]
  if unknown:
    raise errors.UserError(f'--models={",".join(models)}: unknown {unknown}; choose from '
                           f'{list(MODELS)}')
  return dict(config=config, models=models, repeats=repeats, size=config.model.size,
              batch=config.sample.batch_size, dtype=config.model.dtype, **more)


def as_json(opts: dict) -> dict:
  """`opts` with the config as a plain dict."""
  return dict(opts, config=opts['config'].to_dict())


def make_config(name: str, opts: dict, cfg_scales: tuple[float, ...] | None = None
                ) -> ml_collections.ConfigDict:
  """The resolved config of model `name` ('sit' | 'ppf2' | 'ppf3'): opts['config'] with the
  paper's schedule of `name` and one CFG scale (opts['cfg_scale'], default 1) for every stage
  (so CFG costs the same fraction in every model), or `cfg_scales` per stage."""
  stages = MODELS[name]
  c = copy.deepcopy(opts['config'])
  config_lib.set_schedule(c, stages, cfg_scales or (opts.get('cfg_scale', 1.0),) * stages)
  return config_lib.resolve(c)


def peak_bf16_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind (None when not in the table)."""
  return next((p for k, p in PEAK_BF16_FLOPS if k.lower() in device_kind.lower()), None)


def device_info() -> dict:
  """Backend, device kind and count, the bf16 peak (None when unknown, e.g. CPU), versions."""
  dev = jax.devices()[0]
  peak = None if dev.platform == 'cpu' else peak_bf16_flops(dev.device_kind)
  return dict(platform=dev.platform, device_kind=dev.device_kind, device_count=jax.device_count(),
              peak_bf16_flops=peak, jax=jax.__version__, python=platform.python_version(),
              cpu_count=_cpu_count())


def _cpu_count() -> int | None:
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def peak_memory_bytes() -> int | None:
  """Peak device memory since the process started (None where the backend has no stats)."""
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get('peak_bytes_in_use')


def spread(values: list[float]) -> dict:
  """Median, min, max and interquartile range of timed repeats."""
  v = sorted(values)
  q = statistics.quantiles(v, n=4, method='inclusive') if len(v) > 1 else [v[0]] * 3
  return dict(median=statistics.median(v), min=v[0], max=v[-1], q1=q[0], q3=q[2], n=len(v))


def interleaved(runs: dict[str, Callable[[], T]], repeats: int) -> dict[str, list[T]]:
  """`repeats` rounds; each round calls every run once, in an order rotated by one per round.

  Side-by-side timing: whatever load other processes add, every model sees it in every round, so
  per-round ratios (`round_ratios`) compare like with like.
  """
  names, out = list(runs), {n: [] for n in runs}
  for r in range(repeats):
    for n in names[r % len(names):] + names[:r % len(names)]:
      out[n].append(runs[n]())
  return out


def round_ratios(base: list[float], other: list[float]) -> dict:
  """Spread of base[r] / other[r] over rounds: a speed-up measured under one load per round."""
  return spread([b / o for b, o in zip(base, other)])


def mfu(flops_per_second: float, device: dict) -> float | None:
  """Achieved / bf16 dense peak of one device (None on CPU or unknown kinds)."""
  peak = device['peak_bf16_flops']
  return None if peak is None else flops_per_second / (peak * device['device_count'])


def fmt(value, spec: str = '.3g') -> str:
  return '-' if value is None else format(value, spec)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
  return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])


def write_outputs(result: dict, headers: list[str], rows: list[list[str]], *, json_path: str,
                  markdown: bool) -> str:
  """Writes JSON (if asked) and returns the table as Markdown or aligned plain text."""
  if json_path:
    paths.write_text(json_path, json.dumps(result, indent=2))  # a local path or a URL
  if markdown:
    return markdown_table(headers, rows)
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
  return '\n'.join('  '.join(c.rjust(w) for c, w in zip(r, widths)) for r in [headers] + rows)
