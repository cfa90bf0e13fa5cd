"""Ahead-of-time TPU compilation from this CPU (aot.py, hlo.py): a tiny PPF-2 on v5e:2x2.

The compile runs once per module (about a minute on 2 cores): the train step with scanned,
rematerialised blocks, and the two sampler-stage programs, for 4 TPU v5e chips described by
libtpu (requirements-test.txt); no TPU is needed.
"""

from __future__ import annotations

import json
import math

import jax
import pytest
from tests.helpers import tiny_config

from ppflow_jax import aot
from ppflow_jax import hlo

pytest.importorskip('libtpu')


def report_config():
  config = tiny_config(2, hw=32, channels=1)   # stage tokens: 64 (4x4 patches) and 256 (2x2)
  config.model.update(scan_blocks=True, remat='full', dtype='bfloat16')
  config.mesh.update(data=1, fsdp=-1)          # parameters and optimizer state over 4 chips
  config.sample.update(method='euler', num_steps=4)
  return config


@pytest.fixture(scope='module')
def report():
  return aot.run(report_config(), 'v5e:2x2', batch=8, sample_batch=8)


def test_programs_use_mosaic_splash_from_128_tokens(report):
  by_name = {p['program']: p for p in report['programs']}
  assert report['device_kind'] == 'TPU v5 lite' and report['chips'] == 4
  assert set(by_name) == {'train', 'sample/segment0_stage0', 'sample/segment1_stage1'}
  # Training packs every stage into 256-token rows: splash forward, dq and dkv in the block loop.
  assert by_name['train']['mosaic_kernels'] >= 3
  assert by_name['train']['mosaic_calls'] >= 3 * 2   # executed once per block (depth 2)
  assert by_name['sample/segment1_stage1']['tokens'] == 256
  assert by_name['sample/segment1_stage1']['mosaic_kernels'] >= 1
  assert by_name['sample/segment0_stage0']['tokens'] == 64
  assert by_name['sample/segment0_stage0']['mosaic_kernels'] == 0   # 'auto' keeps XLA below 128


def test_params_and_optimizer_state_are_sharded(report):
  train = next(p for p in report['programs'] if p['program'] == 'train')
  trainer = aot.train.Trainer(report_config(), aot.sharding.make_mesh(
      report_config(), aot.topology_devices('v5e:2x2')))
  state = jax.eval_shape(trainer.init_state)
  specs = trainer.state_sharding.opt_state[0].mu['blocks']['attn']['qkv']['kernel'].spec
  assert 'fsdp' in tuple(specs)   # Adam moments follow the (stacked) parameter's sharding
  nbytes = lambda shape, dtype: math.prod(shape) * dtype.itemsize
  full = sum(nbytes(s.shape, s.dtype) for s in jax.tree.leaves(state))
  per_chip = sum(nbytes(sh.shard_shape(s.shape), s.dtype) for s, sh in
                 zip(jax.tree.leaves(state), jax.tree.leaves(trainer.state_sharding)))
  assert per_chip < 0.6 * full   # what fsdp=4 leaves on each chip (biases stay replicated)
  # The compiled program's arguments per chip (TPU tiles pad small leaves) stay well below the
  # replicated state, which every chip would hold without fsdp.
  assert per_chip < train['memory_bytes']['argument'] < 0.6 * full
  assert 'all-gather' in train['collectives']   # fsdp gathers the weights it uses
  assert report['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1}


def test_memory_and_cost_fields_are_sane(report):
  for p in report['programs']:
    mem = p['memory_bytes']
    assert all(v >= 0 for v in mem.values()), p['program']
    assert mem['argument'] > 0 and mem['output'] > 0, (p['program'], mem)
    assert mem['peak'] >= mem['argument'] + mem['temp']
    assert p['fits'] and 0 < p['peak_gib'] < p['hbm_gib'] == 16
    assert p['compiled_flops'] > 0 and p['analytic_flops'] > 0
    # Scanned blocks / sampler loops: XLA's cost counts loop bodies once, the HLO matmul count
    # does not. Without Mosaic kernels it is the analytic count; with them their attention FLOPs
    # are missing from it (a large share at this tiny width: 2.3 in the 256-token sampler stage).
    useful = p['useful_flop_fraction']
    assert p['cost_counts_loops_once'], p['program']
    if not p['mosaic_calls']:  # every FLOP is in the HLO: the counts agree
      assert 0.95 < useful < 1.05, (p['program'], useful)
    else:
      assert 0.5 < useful < 4, (p['program'], useful)
    assert p['lower_s'] > 0 and p['compile_s'] > 0
    assert p['unknown_trip_counts'] == 0
  train = report['programs'][0]
  assert train['memory_bytes']['alias'] > 0 and train['memory_bytes']['temp'] > 0  # donated state
  assert 'train' in aot.format_report(report)


def test_does_not_fit_is_one_line(report):
  shrunk = dict(report, programs=[dict(p, fits=False) for p in report['programs']])
  with pytest.raises(aot.DoesNotFit) as e:
    aot.check_fits(shrunk)
  assert '\n' not in str(e.value) and 'needs' in str(e.value) and 'remat' in str(e.value)


def test_v4_topologies_have_one_device_per_chip():
  devices = aot.topology_devices('v4:2x2x1')
  assert len(devices) == 4 and devices[0].device_kind == 'TPU v4'


def test_topology_names_are_checked():
  assert aot.parse_topology('v5p:4x4x2') == ('v5p', (4, 4, 2))
  with pytest.raises(ValueError, match='--topology=.v5x:2x2. must look like'):
    aot.parse_topology('v5x:2x2')


HLO = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %c = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %q = (s32[], f32[8]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %x = f32[8] get-tuple-element(%q), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%j, %one)
  %ag = f32[8]{0} all-gather(%x), dimensions={0}
  %lhs = bf16[2,16,32]{2,1,0:T(8,128)} parameter(1)
  %rhs = bf16[32,64]{1,0} parameter(2)
  %mm = f32[2,16,64]{2,1,0:T(8,128)} convolution(%lhs, %rhs), window={size=1}, dim_labels=0bf_io->0bf
  %k = (f32[8]{0}, f32[8]{0}) custom-call(%ag), custom_call_target="tpu_custom_call", backend_config="x
}"
  ROOT %t = (s32[], f32[8]) tuple(%next, %ag)
}

%cond2 (p: (u32[], f32[8])) -> pred[] {
  %p2 = (u32[], f32[8]) parameter(0)
  %i2 = u32[] get-tuple-element(%p2), index=0
  %c2 = u32[]{:T(128)} constant(8)
  ROOT %lt2 = pred[] compare(%i2, %c2), direction=LT
}

%body2 (p: (u32[], f32[8])) -> (u32[], f32[8]) {
  %q2 = (u32[], f32[8]) parameter(0)
  %j2 = u32[] get-tuple-element(%q2), index=0
  %jc = u32[] copy(%j2)
  %x2 = f32[8] get-tuple-element(%q2), index=1
  %two = u32[] constant(2)
  %next2 = u32[] add(%jc, %two)
  %cp = f32[8]{0} collective-permute(%x2), source_target_pairs={{0,1},{1,0}}
  ROOT %t2 = (u32[], f32[8]) tuple(%next2, %cp)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8] parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]) tuple(%zero, %a)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  %uzero = u32[] constant(0)
  %uzero.copy = u32[] copy(%uzero)
  %init2 = (u32[], f32[8]) tuple(%uzero.copy, %a)
  %w2 = (u32[], f32[8]) while(%init2), condition=%cond2, body=%body2
  %ars = f32[4]{0} all-reduce-start(%a), to_apply=%add
  %ar = f32[4]{0} all-reduce-done(%ars)
  %x3 = f32[4,3]{1,0} parameter(1)
  %y3 = f32[3,5]{1,0} parameter(2)
  %d = f32[4,5]{1,0} dot(%x3, %y3), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %padded = f32[1,16,8]{2,1,0} convolution(%lhs1, %rhs1), window={size=16 pad=15_15}, dim_labels=b0f_0io->b0f
  %lhs1 = f32[1,1,8]{2,1,0} parameter(3)
  %rhs1 = f32[16,8,8]{2,1,0} parameter(4)
  ROOT %r = f32[8] get-tuple-element(%w), index=1
}
"""


def test_hlo_counts_loop_bodies_by_trip_count():
  stats = hlo.analyze(HLO)
  # %w runs 0..4 in steps of 1 (5 trips); %w2 runs 0, 2, 4, 6 (4 trips: a collective-matmul
  # loop's two windows per iteration), its counter read through copies.
  assert stats.collectives == {'all-gather': {'count': 5.0, 'bytes': 5 * 32.0},
                               'all-reduce': {'count': 1.0, 'bytes': 16.0},
                               'collective-permute': {'count': 4.0, 'bytes': 4 * 32.0}}
  assert (stats.mosaic_kernels, stats.mosaic_calls, stats.unknown_trip_counts) == (1, 5, 0)
  # The loop body's (2x16, 32) @ (32, 64) five times, the entry's (4, 3) @ (3, 5) once, and a
  # convolution whose 16-wide window sees its one input position once per output position
  # (the other 15 of each window are padding): 16 x (8 x 8) multiply-adds.
  assert stats.matmul_flops == (5 * 2 * (2 * 16 * 64) * 32 + 2 * (4 * 5) * 3
                                + 2 * 16 * 8 * 8)


def test_logical_axis_rules_come_from_the_config():
  """config.mesh.rules re-shards parameters without code changes (here on 4 TPU chips)."""
  config = report_config()
  config.mesh.update(fsdp=2, tensor=2)
  devices = aot.topology_devices('v5e:2x2')
  fc1 = lambda c: aot.train.Trainer(c, aot.sharding.make_mesh(c, devices)).state_sharding.params[
      'blocks']['mlp']['fc1']['kernel'].spec
  assert tuple(fc1(config)) == (None, 'fsdp', 'tensor')        # (layers, embed, mlp)
  config.mesh.rules = tuple(r for r in config.mesh.rules if r[0] != 'mlp') + (('mlp', None),)
  assert tuple(fc1(config)) == (None, 'fsdp', None)


def test_benchmark_rows_and_markdown(report):
  from ppflow_jax.bench import aot as bench_aot  # pylint: disable=g-import-not-at-top
  cmd = bench_aot.row_command('ppf_xl_2_v5e16_b256_scan_full')
  assert '--topology=v5e:4x4' in cmd and '--batch=256' in cmd and '--config.model.remat=full' in cmd
  sample = bench_aot.row_command('sit_xl_2_v5p32_b1024_unrolled_s')
  assert '--programs=sample' in sample and '--config.mesh.data=-1' in sample
  with pytest.raises(ValueError, match='must be'):
    bench_aot.row_command('ppf_xl_9_v5e16_b256_unrolled')
  table = bench_aot.markdown([dict(row='tiny', report=report), dict(row='big', error='x')])
  assert table.count('\n| tiny ') == 3 and '| big |' in table


def test_multi_slice_mesh_puts_data_across_slices():
  config = report_config()
  devices = aot.topology_devices('v5e:2x2', num_slices=2)
  config.mesh.update(data=2, fsdp=-1)
  mesh = aot.sharding.make_mesh(config, devices)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]
  config.mesh.update(data=1, fsdp=-1)
  with pytest.raises(ValueError, match='must be a multiple of the 2 slices'):
    aot.sharding.make_mesh(config, devices)


# -- the largest batch that fits (the search logic; a real XL search is docs/tpu_aot.md's) -------


# PPF-XL-3, scanned, no remat, v5e-16 (docs/tpu_aot/ppf_xl_3_v5e16_bmax_scan_none.json): the peak
# at 38 is lower than at 37, and every size above 38 ran the TPU compiler out of memory (None).
XL3_NO_REMAT = {4: 2.4851, 8: 4.1190, 37: 15.8839, 38: 15.8676}


@pytest.mark.parametrize('peak, hbm, limit, expected', [
    (lambda n: 1.0 + 0.37 * n, 16, 4096, 40),                      # linear: (16 - 1) / 0.37
    (lambda n: 1.0 + 0.37 * n if n < 30 else None, 16, 4096, 29),  # the compiler OOMs first
    (lambda n: 2.0 + 0.1 * n + (5 if n > 50 else 0), 16, 4096, 90),  # a step in memory
    (lambda n: 20.0, 16, 4096, 0),                                 # nothing fits
    (lambda n: 0.1 * n, 16, 64, 64),                               # everything up to the limit
    (lambda n: 0.8 + 0.04 * n + 3e-5 * n * n, 16, 4096, 308),      # slightly superlinear (XL)
    (XL3_NO_REMAT.get, 16, 4096, 38),                              # a peak below the one before
])
def test_largest_fitting_finds_the_boundary(peak, hbm, limit, expected):
  calls = []
  best, trials = aot.largest_fitting(lambda n: calls.append(n) or peak(n), hbm, limit=limit)
  assert best == expected
  assert [t['n'] for t in trials] == calls and len(set(calls)) == len(calls)  # no repeats
  fits = {t['n'] for t in trials if t['fits']}
  assert (best in fits or best == 0) and (best + 1 in calls or best == limit)  # both sides seen
  if expected == 40:
    assert len(calls) <= 4   # linear memory: two sizes, the prediction, one above it
  if expected == 308:
    assert len(calls) <= 7   # the secant closes in where the first line overshot
  if expected == 38:
    assert calls == [4, 8, 37, 38, 39]  # steps up from 38 (the run bisected from 4096: 15)


def test_search_batch_counts_global_batch_over_batch_shards(monkeypatch):
  config = report_config()
  config.mesh.update(data=2, fsdp=2)
  seen = []

  def fake_run(cfg, topology, programs, batch, num_slices, hbm_gib):
    seen.append((programs, batch, hbm_gib))
    if batch // 4 > 12:
      raise aot.DoesNotFit('train: the TPU compiler ran out of HBM')
    return dict(programs=[dict(peak_gib=0.5 + 0.25 * batch / 4, compile_s=1.0)])

  monkeypatch.setattr(aot, 'run', fake_run)
  result = aot.search_batch(config, 'v5e:2x2', hbm_gib=3.0)
  assert result['batch_shards'] == 4 and result['hbm_gib'] == 3.0
  assert result['largest_per_chip'] == 10 and result['largest_global_batch'] == 40
  assert result['confirmed']
  assert all(p == ('train',) and b % 4 == 0 and h == 3.0 for p, b, h in seen)
  text = aot.format_search(result)
  assert 'largest train batch that fits 3 GiB per chip on v5e:2x2' in text
  assert '10 per chip = global 40' in text


def test_grid_takes_the_cheapest_policy_that_fits(report, tmp_path, monkeypatch):
  from ppflow_jax.bench import aot as bench_aot  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(bench_aot, 'OUT', str(tmp_path))
  ran = []

  def fake_run_row(name):
    ran.append(name)
    if name.endswith('scan_none'):
      return dict(row=name, returncode=2, error='does not fit: train: 20.1 GiB per chip')
    return dict(row=name, returncode=0, report=report)

  monkeypatch.setattr(bench_aot, 'run_row', fake_run_row)
  bench_aot.run_cell('sit_xl_2', 'v5e16', 1024)
  assert ran == ['sit_xl_2_v5e16_b1024_scan_none', 'sit_xl_2_v5e16_b1024_scan_full']
  bench_aot.run_cell('sit_xl_2', 'v5e16', 1024)  # both rows saved: nothing compiled again
  assert len(ran) == 2
  results = [json.load(open(p)) for p in sorted(tmp_path.glob('*.json'))]
  table = bench_aot.markdown(results)
  line = next(l for l in table.splitlines() if l.startswith('| sit_xl_2 | v5e:4x4 |'))
  chips = report['chips']
  assert f"| {chips} | 1024 | {1024 // chips} | {report['model']['remat']} |" in line
  assert 'sit_xl_2_v5e16_b1024_scan' not in table  # grid rows only in the grid table


def test_search_rows_and_their_table():
  from ppflow_jax.bench import aot as bench_aot  # pylint: disable=g-import-not-at-top
  cmd = bench_aot.row_command('ppf_xl_2_v5e16_bmax_scan_full')
  assert '--search_batch' in cmd and not any(c.startswith('--batch') for c in cmd)
  with pytest.raises(ValueError, match='no _s with bmax'):
    bench_aot.row_command('ppf_xl_2_v5e16_bmax_scan_full_s')
  program = dict(peak_gib=15.8, lower_s=3.0, compile_s=100.0, lower_cpu_s=2.0, compile_cpu_s=90.0)
  search = dict(batch_shards=16, remat='full', scan_blocks=True, largest_per_chip=40,
                largest_global_batch=640, hbm_gib=16, confirmed=True, trials=[{}] * 4,
                report=dict(programs=[program]))
  table = bench_aot.markdown([dict(row='ppf_xl_2_v5e16_bmax_scan_full', report=search)])
  assert ('| ppf_xl_2_v5e16_bmax_scan_full | 16 | full | True | 40 | 640 | 15.80 | 16 | yes | 4 '
          '| 103 (92) |') in table
