"""bench/: tiny SiT vs PPF sampling and training benchmarks run end to end on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import pytest

from ppflow_jax import config_lib
from ppflow_jax import errors
from ppflow_jax import flops
from ppflow_jax import sampling
from ppflow_jax import stages as stages_lib
from ppflow_jax.bench import attention as bench_attention
from ppflow_jax.bench import block as bench_block
from ppflow_jax.bench import common
from ppflow_jax.bench import sample as bench_sample
from ppflow_jax.bench import train as bench_train
from ppflow_jax.bench import vs_torch
from tests.helpers import ROOT



def tiny_opts(models) -> dict:
  """configs/bench.py:tiny, one block narrower still; one timed repeat."""
  config = config_lib.load_config('bench:tiny')
  config.model.update(depth=1, hidden_size=32)
  return common.options(config, models, repeats=1, cfg_scale=1.5)


def test_peak_table_and_spread():
  assert common.peak_bf16_flops('NVIDIA H100 80GB HBM3') == 989e12
  assert common.peak_bf16_flops('NVIDIA A100-SXM4-40GB') == 312e12
  assert common.peak_bf16_flops('TPU v5 lite') == 197e12  # v5e reports itself as "v5 lite"
  assert common.peak_bf16_flops('TPU v5') == 459e12
  assert common.peak_bf16_flops('TPU v6 lite') == 918e12
  assert common.peak_bf16_flops('cpu') is None
  assert common.mfu(1e12, dict(peak_bf16_flops=None, device_count=1)) is None
  assert common.mfu(494.5e12, dict(peak_bf16_flops=989e12, device_count=1)) == 0.5
  s = common.spread([4.0, 1.0, 3.0, 2.0, 10.0])
  assert (s['median'], s['min'], s['max'], s['q1'], s['q3']) == (3.0, 1.0, 10.0, 2.0, 4.0)
  with pytest.raises(errors.UserError, match='unknown'):
    tiny_opts(['dit'])


def test_sample_benchmark_tiny():
  spec = sampling.SamplerSpec(method='heun', num_steps=9)  # 8 steps: every stage gets a full step
  opts = tiny_opts(['sit', 'ppf3'])
  result = bench_sample.run_benchmark(opts, spec)
  sit, ppf3 = result['results']
  assert result['options']['config']['model']['depth'] == 1  # the config, as JSON
  for r in result['results']:
    config = common.make_config(r['model'], opts)
    assert tuple(config.schedule.cfg_scales) == (1.5,) * common.MODELS[r['model']]
    expected = sampling.num_evaluations(stages_lib.from_config(config), spec)
    assert [s['evaluations'] for s in r['stages']] == expected and sum(expected) == 16
    assert r['traces'] == len(expected)  # one compiled program per stage
    assert r['images_per_second'] > 0 and r['compile_seconds'] > 0
    assert all(s['ms_per_nfe']['median'] > 0 for s in r['stages'])
    # Every stage is guided at the same scale, so the bound is the paper-style ratio.
    assert r['speedup_flops_bound'] == pytest.approx(1 / flops.testing_flops_ratio(config, spec))
  assert sit['speedup'] == 1.0 and ppf3['speedup_flops_bound'] > 1.8
  headers, rows = bench_sample.table(result)
  md = common.write_outputs(result, headers, rows, json_path='', markdown=True)
  assert md.count('\n') == 3 and '| PPF-3 |' in md and '4x4:' in md


def test_train_benchmark_tiny():
  opts = tiny_opts(['sit', 'ppf2'])
  result = bench_train.run_benchmark(opts, steps=1, packings=(True,))
  sit, ppf2 = result['results']
  assert (sit['packing'], ppf2['packing']) == (None, True)
  assert ppf2['bucket_sizes'] == [2, 2]
  assert (sit['tokens_per_step'], ppf2['tokens_per_step']) == (4 * 64, 2 * 16 + 2 * 64)
  config = common.make_config('ppf2', opts)
  assert ppf2['speedup_flops_bound'] == pytest.approx(
      1 / flops.training_flops(config, batch_size=4)['ratio'])
  # CPU: the xla attention attends within each slot; the one padding slot is computed too.
  assert ppf2['packed_attention'] == 'xla'
  assert ppf2['packed_flops_per_step'] == pytest.approx(
      4 * flops.training_flops(config, batch_size=4)['packed_flops_per_image'])
  assert ppf2['speedup_packed_bound'] < ppf2['speedup_flops_bound']
  assert ppf2['images_per_second'] > 0 and ppf2['mfu'] is None  # CPU: no MFU
  headers, rows = bench_train.table(result)
  assert len(rows) == 2 and rows[0][1] == 'n/a' and rows[1][1] == 'yes'


@pytest.mark.slow
def test_sample_cli_writes_json(tmp_path):
  out = tmp_path / 'sample.json'
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'ppflow_jax.bench.sample', '--config=bench:tiny', '--models=sit',
       '--steps=8', '--repeats=1', f'--json={out}', '--markdown'],
      cwd=ROOT, env=env, capture_output=True, text=True, check=True)
  assert '| SiT |' in proc.stdout
  result = json.loads(out.read_text())
  assert result['benchmark'] == 'sample' and result['device']['platform'] == 'cpu'
  assert result['sampler'] == dict(method='heun', num_steps=9)


def test_vs_torch_acceptance_names_what_fails():
  stage = lambda patch, ratio: dict(patch=patch, jax_over_torch=ratio)
  results = [dict(label='SiT', stages=[stage([2, 2], 0.9)], jax_speedup_vs_bound=1.0),
             dict(label='PPF-2', stages=[stage([4, 4], 1.2), stage([2, 2], 1.0)],
                  jax_speedup_vs_bound=1.15)]
  got = vs_torch.acceptance(results)
  assert got['stages_slower_than_torch'] == ['PPF-2 4x4: 1.20x']
  assert got['speedups_off_bound'] == ['PPF-2: 1.15 of the bound']
  assert not got['every_stage_at_most_torch'] and not got['speedups_within_10pct_of_bound']
  results[1].update(stages=[stage([4, 4], 1.0)], jax_speedup_vs_bound=0.95)
  assert vs_torch.acceptance(results) == dict(
      every_stage_at_most_torch=True, stages_slower_than_torch=[],
      speedups_within_10pct_of_bound=True, speedups_off_bound=[])


def test_gpu_suite_runs_end_to_end_on_cpu(tmp_path):
  """The accelerator suite (sampling and training, ours vs torch) at a tiny size on CPU."""
  pytest.importorskip('torch')
  out = tmp_path / 'suite.json'
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'ppflow_jax.bench.suite', '--config=bench:tiny', '--models=ppf2',
       '--steps=4', '--train_steps=1', '--rounds=1', '--repeats=1', '--torch_threads=1',
       f'--json={out}'],
      cwd=ROOT, env=env, capture_output=True, text=True, check=True)
  assert '| PPF-2 |' in proc.stdout and '| PPF-2 | torch | n/a |' in proc.stdout
  result = json.loads(out.read_text())
  (ppf2,) = result['sampling']
  assert ppf2['cfg_scales'] == [1.0, 3.0]  # the paper's per-stage scales
  # Same weights, noise, plan and CFG on both sides: the samples agree.
  assert ppf2['max_sample_diff'] < 1e-4
  assert [s['evaluations'] for s in ppf2['stages']] == [5, 3]
  assert all(s['torch_ms_per_eval']['median'] > 0 for s in ppf2['stages'])
  jax_runs, torch_runs = result['training']['jax'], result['training']['torch']
  assert [r['packing'] for r in jax_runs] == [False, True]
  assert [r['bucket_sizes'] for r in torch_runs] == [[2, 2]]
  assert all(r['images_per_second'] > 0 and r['mfu'] is None for r in jax_runs + torch_runs)


def test_attention_candidates_agree_and_are_timed():
  opts = dict(batch=2, heads=2, head_dim=8, dtype='float32', lengths=[16], rounds=1, calls=1)
  rows = bench_attention.bench_length(16, opts)  # asserts every candidate matches ops.attention
  names = set(bench_attention.JAX_CANDIDATES)
  assert names <= {r['candidate'] for r in rows}
  assert {r['segments'] for r in rows} == {'none', 'packed'}
  assert {r['segments'] for r in rows if r['candidate'] == 'xla_blockwise'} == {'packed'}
  assert all(r['ms']['median'] > 0 for r in rows)
  headers, table_rows = bench_attention.table(dict(options=opts, results=rows))
  assert [r[:2] for r in table_rows] == [['16', 'none'], ['16', 'packed']]
  assert table_rows[0][-1] in names | {'torch_sdpa'}


def test_block_parts_agree_with_torch_and_are_timed():
  """Every part of the block equals the torch reference's (asserted inside `run`) and is timed."""
  pytest.importorskip('torch')
  opts = dict(batch=2, length=16, width=32, heads=2, per_row=4, dtype='float32', rounds=2,
              calls=1)
  rows = bench_block.run(opts)
  assert [r['part'] for r in rows] == ['norm_modulate', 'gelu', 'mlp', 'attention', 'modulation',
                                       'block', 'block_packed']
  assert all(r['jax_ms']['median'] > 0 and r['torch_ms']['n'] == 2 for r in rows)
  headers, table_rows = bench_block.table(dict(results=rows))
  assert len(headers) == 4 and len(table_rows) == 7
