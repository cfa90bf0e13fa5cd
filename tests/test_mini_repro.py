"""The mini reproduction (mini_repro.py) end to end with configs/mini_repro.py:quick (three models
trained and fine-tuned from SiT, sampled side by side, scored and tabulated) and :converged_quick
(the SiT's plateau loop, two seeds, two fine-tuning fractions, the initialised PPFs)."""

from __future__ import annotations

import copy
import json
import os
import re

import numpy as np
import pytest
from flax import traverse_util

from ppflow_jax import checkpoint, config_lib, errors, flops, sampling, summary
from ppflow_jax.experiments import mini_repro


@pytest.mark.slow  # ~1 min of CPU time (2 cores); 2+ min when the box is shared.
def test_quick_run(tmp_path):
  workdir = str(tmp_path)
  config = config_lib.load_config('mini_repro:quick')
  result = mini_repro.run(workdir, config)
  for name in ('results.json', 'results.md', 'fid_vs_time.png', 'samples.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['rows'] == json.loads(json.dumps(result['rows']))

  # one SiT, its untrained floor, and per PPF the initialised and the fine-tuned model
  rows = {(r['stages'] if r['train_steps'] else 0, r['finetune_steps']): r for r in result['rows']}
  sit_steps = config.train.steps
  ft = max(1, sit_steps // 10)
  assert result['finetune_steps'] == [mini_repro.finetune_steps(sit_steps, 0.1)] == [ft]
  assert sorted(rows) == [(0, 0), (1, 0), (2, 0), (2, ft), (3, 0), (3, ft)]
  rows.update({k: rows[k, ft if k > 1 else 0] for k in (0, 1, 2, 3)})  # by stages, fine-tuned
  assert rows[1]['train_steps'] == rows[2, 0]['train_steps'] == sit_steps
  assert rows[2]['train_steps'] == rows[3]['train_steps'] == sit_steps + ft
  # FLOPs: SiT is the reference; PPF-3 is cheaper than PPF-2, both recomputed independently.
  assert rows[1]['flops_ratio'] == 1.0 and rows[1]['speedup'] == 1.0
  for k in (2, 3):
    cfg = mini_repro.make_config(config, k, finetune_steps=ft)
    assert rows[k]['flops_ratio'] == flops.testing_flops_ratio(
        cfg, sampling.SamplerSpec.from_config(cfg))
    assert sum(rows[k]['evaluations']) == config.sample.num_steps - 1  # Euler: one per step
  assert rows[3]['flops_ratio'] < rows[2]['flops_ratio'] < 1.0
  for k in (1, 2, 3):
    assert rows[k]['seconds_per_batch'] > 0 and np.isfinite(rows[k]['fid'])
    assert 0 <= rows[k]['precision'] <= 1 and 0 <= rows[k]['recall'] <= 1
  table = open(os.path.join(workdir, 'results.md')).read()
  results, changes = table.split('Where fine-tuning goes')
  assert results.count('| PPF-') == 4 and '| SiT (2x2) |' in results
  assert changes.count('| PPF-') == 2  # one weight-change line per fine-tuned PPF
  assert f'| {sit_steps} + 0 |' in table and f'| {sit_steps} + {ft} |' in table

  # The fine-tunes started from the paper's initialisation of the SiT's EMA weights: the
  # transformer blocks of the saved init equal the SiT's.
  sit_cfg = mini_repro.make_config(config, 1)
  ppf_cfg = mini_repro.make_config(config, 2, finetune_steps=ft)
  from ppflow_jax import sharding  # pylint: disable=g-import-not-at-top
  sit = checkpoint.restore_for_inference(os.path.join(workdir, 'sit'), sit_cfg,
                                         sharding.make_mesh(sit_cfg))
  init = checkpoint.load_params(os.path.join(workdir, f'ppf2_sit{sit_steps}_init_s0'), ppf_cfg,
                                sharding.make_mesh(ppf_cfg))
  sit_flat = traverse_util.flatten_dict(sit.ema)
  init_flat = traverse_util.flatten_dict(init)
  blocks = [p for p in sit_flat if p[0] == 'blocks']
  assert blocks
  for p in blocks:
    np.testing.assert_array_equal(np.asarray(init_flat[p]), np.asarray(sit_flat[p]))
  assert int(sit.step) == sit_steps


@pytest.mark.slow  # ~4 min of CPU time (8 min when shared): 2 SiT chunks, 8 fine-tunes, 14 models.
def test_converged_quick_run(tmp_path):
  workdir = str(tmp_path)
  config = config_lib.load_config('mini_repro:converged_quick')
  mr = config.mini_repro
  result = mini_repro.run(workdir, config)

  # The plateau history: one check per chunk of plateau_every steps, finite, persisted, and the
  # loop stopped at a plateau or at max_steps.
  history = result['plateau']
  steps = [h['step'] for h in history]
  assert steps == list(range(mr.plateau_every, steps[-1] + 1, mr.plateau_every))
  assert all(np.isfinite(h['loss']) and np.isfinite(h['fid']) and h['fid_std'] > 0
             and h['loss_std'] > 0 for h in history)
  with open(os.path.join(workdir, 'sit', mini_repro.PLATEAU)) as f:
    assert json.load(f) == history
  reached = mini_repro.plateaued(history, mr.patience, mr.plateau_tol, mr.plateau_noise)
  assert reached or steps[-1] == mr.max_steps
  assert not any(mini_repro.plateaued(history[:i], mr.patience, mr.plateau_tol, mr.plateau_noise)
                 for i in range(1, len(history)))  # it stopped at the first plateau
  sit_steps = result['sit_steps']
  assert sit_steps == steps[-1]
  # The PPFs' workdirs name the SiT step they start from: a SiT trained further (a higher
  # max_steps, same workdir) gets fresh initialisations instead of reusing these.
  assert {d for d in os.listdir(workdir) if d.startswith('ppf')} == {
      f'ppf{k}_sit{sit_steps}_{kind}_s{seed}' for k in (2, 3) for seed in mr.seeds
      for kind in ['init'] + [f'ft{mini_repro.finetune_steps(sit_steps, f)}'
                              for f in mr.finetune_fractions]}

  # Rows: per seed, per PPF the initialised model and both fine-tuning fractions.
  fts = [mini_repro.finetune_steps(sit_steps, f) for f in mr.finetune_fractions]
  assert result['finetune_steps'] == fts and len(set(fts)) == 2
  got = {(r['stages'], r['finetune_steps'], r['seed']) for r in result['rows'] if r['train_steps']}
  want = {(1, 0, config.seed)} | {(k, ft, seed) for k in (2, 3) for ft in [0] + fts
                                   for seed in mr.seeds}
  assert got == want
  for r in result['rows']:
    if r['train_steps']:
      assert r['train_steps'] == sit_steps + r['finetune_steps']
      for key in ('fid', 'precision', 'recall', 'seconds_per_batch', 'fid_floor_n'):
        assert np.isfinite(r[key]), (r['model'], key)
    if r['stages'] > 1 and r['finetune_steps']:  # the 'why' columns of every fine-tune
      assert np.isfinite(r['fid_finest_only'])
      assert r['param_change']['blocks'] > 0 and np.isfinite(r['param_change']['embed[0]'])
  # Every model runs the recipe's patches (converged: doubled) and its row says so.
  labels = {r['stages']: r['model'] for r in result['rows'] if r['train_steps']}
  assert labels == {1: 'SiT (4x4)', 2: 'PPF-2 (8x8 | 4x4)', 3: 'PPF-3 (8x8 | 4x8 | 4x4)'}
  # The seeds differ: two fine-tunes of the same budget do not give the same weights or FID.
  ppf2 = [r['fid'] for r in result['rows'] if r['stages'] == 2 and r['finetune_steps'] == fts[1]]
  assert len(ppf2) == 2 and ppf2[0] != ppf2[1]

  table = open(os.path.join(workdir, 'results.md')).read()
  for ft in [0] + fts:
    assert table.count(f'| {sit_steps} + {ft} |') == 2  # PPF-2 and PPF-3, seeds aggregated
  assert ' ± ' in table and '| SiT step |' in table
  for h in history:
    assert f'| {h["step"]} | {h["loss"]:.4f} | {h["loss_std"]:.4f} | {h["fid"]:.2f} |' in table


def test_plateaued_needs_patience_checks_without_relative_improvement():
  h = [dict(loss=1.0, fid=100.0), dict(loss=0.995, fid=99.0)]  # < 2% better: flat
  assert not mini_repro.plateaued(h[:1], patience=1, tol=0.02)  # nothing to compare with yet
  assert mini_repro.plateaued(h, patience=1, tol=0.02)
  assert not mini_repro.plateaued(h, patience=1, tol=0.001)
  h2 = h + [dict(loss=0.99, fid=80.0)]  # the FID still improves: not a plateau
  assert not mini_repro.plateaued(h2, patience=1, tol=0.02)
  assert not mini_repro.plateaued(h2, patience=2, tol=0.02)


def test_plateaued_counts_an_fid_gain_within_the_checks_noise_as_flat():
  h = [dict(loss=1.0, fid=20.0, fid_std=1.5), dict(loss=1.0, fid=17.5, fid_std=1.5)]
  assert not mini_repro.plateaued(h, patience=1, tol=0.02)  # 12.5% better: not flat by tol
  assert mini_repro.plateaued(h, patience=1, tol=0.02, noise=2.0)  # 2.5 < 2 x 1.5: noise
  assert not mini_repro.plateaued(h, patience=1, tol=0.02, noise=1.0)  # 2.5 > 1 x 1.5
  # The best recent check's noise counts; a history without 'fid_std' falls back to tol.
  h2 = [dict(loss=1.0, fid=20.0), dict(loss=1.0, fid=17.5)]
  assert not mini_repro.plateaued(h2, patience=1, tol=0.02, noise=2.0)


def test_plateaued_counts_a_loss_gain_within_the_chunks_standard_error_as_flat():
  h = [dict(loss=0.1917, loss_std=0.003, fid=10.0), dict(loss=0.1854, loss_std=0.0034, fid=10.0)]
  assert not mini_repro.plateaued(h, patience=1, tol=0.02)  # 3.3% better: not flat by tol
  assert mini_repro.plateaued(h, patience=1, tol=0.02, noise=2.0)  # 0.0063 < 2 x 0.0034
  assert not mini_repro.plateaued(h, patience=1, tol=0.02, noise=1.0)
  # The best recent chunk's error counts, not the best earlier one's.
  h[1]['loss_std'], h[0]['loss_std'] = 0.001, 0.01
  assert not mini_repro.plateaued(h, patience=1, tol=0.02, noise=2.0)


def test_plateau_summary_says_why_training_stopped():
  config = config_lib.load_config('mini_repro:converged')
  flat = [dict(loss=0.19, loss_std=0.003, fid=10.0, fid_std=1.0)] * 4
  assert mini_repro.plateau_summary(config, flat)['plateau_stop'] == (
      "loss and FID did not improve by more than the larger of 2% and 2x their noise (the "
      "loss's standard error, the FID's bootstrap std) over the last 3 checks")
  falling = [dict(loss=1.0 - 0.1 * i, fid=100.0 - 10 * i) for i in range(4)]
  assert mini_repro.plateau_summary(config, falling)['plateau_stop'] == (
      'max_steps=16000 reached before a plateau')


def test_chunk_loss_is_the_mean_and_standard_error_of_the_chunks_records(tmp_path):
  losses = [0.5, 0.3, 0.4, 0.2, 9.0]  # steps 10..50; the last is outside the chunk
  with open(tmp_path / summary.METRICS, 'w') as f:
    for i, loss in enumerate(losses):
      f.write(json.dumps(dict(step=10 * (i + 1), loss=loss)) + '\n')
  mean, std_error = mini_repro.chunk_loss(str(tmp_path), 0, 40)
  np.testing.assert_allclose([mean, std_error], [0.35, np.std(losses[:4], ddof=1) / 2])
  assert mini_repro.chunk_loss(str(tmp_path), 30, 40) == (0.2, 0.0)  # one record: no error
  with pytest.raises(errors.UserError, match='no loss between steps 50 and 60'):
    mini_repro.chunk_loss(str(tmp_path), 50, 60)


@pytest.mark.parametrize('field,value,says', [
    ('seeds', (), 'seeds and .finetune_fractions'),
    ('finetune_fractions', (0.0,), 'must be > 0'),
    ('max_steps', 3, 'max_steps=3 must be >= plateau_every=5'),
    ('plateau_noise', -1.0, 'plateau_noise=-1.0 >= 0'),
    ('patch_scale', 3, 'patch_scale=3 must be 1, 2 or 4'),
    ('finetune_warmup_fraction', 1.0, 'finetune_warmup_fraction=1.0 must be in [0, 1)'),
    ('finetune_lr', -1.0, 'finetune_lr=-1.0 >= 0'),
])
def test_bad_recipe_one_line(field, value, says):
  config = config_lib.load_config('mini_repro:converged_quick')
  config.mini_repro[field] = value
  with pytest.raises(errors.UserError, match=re.escape(says)):
    mini_repro.check_recipe(config)


@pytest.mark.parametrize('scale,patches', [
    (1, ((4, 4), (2, 2))), (2, ((8, 8), (4, 4)))])
def test_patch_scale_multiplies_every_patch_of_the_schedule(scale, patches):
  config = config_lib.load_config('mini_repro')
  config.mini_repro.patch_scale = scale
  c = mini_repro.make_config(config, 2)
  assert tuple(map(tuple, c.schedule.patch_sizes)) == patches
  assert tuple(c.schedule.boundaries) == (0.5,)
  assert config_lib.model_label('ppf2', True, scale) == (
      f'PPF-2 ({patches[0][0]}x{patches[0][1]} | {patches[1][0]}x{patches[1][1]})')


def test_finetune_fields_set_the_finetune_recipe_only():
  config = config_lib.load_config('mini_repro')
  default = mini_repro.make_config(config, 2, finetune_steps=40)
  assert (default.train.lr, default.train.warmup_steps) == (config.train.lr, 10)
  assert default.train.ema_decay == config.mini_repro.finetune_ema_decay
  config.mini_repro.update(finetune_lr=3e-4, finetune_warmup_fraction=0.0,
                           finetune_ema_decay=0.99)
  tuned = mini_repro.make_config(config, 2, finetune_steps=40)
  assert (tuned.train.lr, tuned.train.warmup_steps, tuned.train.ema_decay) == (3e-4, 0, 0.99)
  sit = mini_repro.make_config(config, 1)  # the SiT keeps its own recipe
  assert (sit.train.lr, sit.train.warmup_steps) == (config.train.lr, config.train.warmup_steps)


def test_markdown_aggregates_seeds_and_lists_the_plateau(tmp_path):
  def row(model, stages, ft, seed, fid):
    return dict(model=model, stages=stages, train_steps=100 + ft, finetune_steps=ft, seed=seed,
                fid_floor_n=fid, fid=fid, precision=0.5, recall=0.25, seconds_per_batch=2.0,
                speedup=1.0, flops_ratio=0.5, timed_batches=2)
  rows = [row('SiT (2x2)', 1, 0, 0, 10.0)]
  rows += [row('PPF-2 (4x4 | 2x2)', 2, ft, seed, 20.0 + ft + 2 * seed)
           for seed in (0, 1) for ft in (0, 10)]
  for r in rows[1:]:
    if r['finetune_steps']:
      r['param_change'] = {'blocks': 0.01 * (1 + r['seed']), 'embed[0]': 0.5,
                           'de-embed[0]': 0.25, 'level_embedder': 2.0}
      r['fid_finest_only'] = 12.0 + r['seed']
  result = dict(rows=rows, sampler='euler', num_samples=20, sample_batch=10, device='cpu',
                floor_samples=10, classifier_test_accuracy=0.9, seeds=[0, 1],
                plateau=[dict(step=50, loss=0.5, fid=12.0),  # written before noise was recorded
                         dict(step=100, loss=0.49, loss_std=0.01, fid=11.9, fid_std=1.5)],
                plateau_every=50, plateau_stop='max_steps=100 reached before a plateau')
  table = mini_repro.markdown(result)
  mini_repro.plot(result, str(tmp_path / 'fid_vs_time.png'))  # one point per seed group
  assert (tmp_path / 'fid_vs_time.png').stat().st_size > 0
  assert '| PPF-2 (4x4 \\| 2x2) | 100 + 0 | 21.00 ± 1.00 |' in table
  assert '| PPF-2 (4x4 \\| 2x2) | 100 + 10 | 31.00 ± 1.00 |' in table
  assert '| SiT (2x2) | 100 | 10.00 |' in table
  assert '| 50 | 0.5000 | - | 12.00 | - |' in table and 'max_steps=100 reached' in table
  assert '| 100 | 0.4900 | 0.0100 | 11.90 | 1.50 |' in table
  # The weight-change table: one line per fine-tuned model, groups in a fixed order, seed means.
  assert ('| model | fine-tuning steps | FID finest only | blocks | embed[0] | de-embed[0] | '
          'level_embedder |') in table
  assert '| PPF-2 (4x4 \\| 2x2) | 10 | 12.50 | 0.015 | 0.500 | 0.250 | 2.000 |' in table


def test_param_change_is_relative_per_group():
  init = {'blocks': {'w': np.ones((2, 3)), 'b': np.zeros(3)},
          'x_embedders': {0: {'kernel': np.full(4, 2.0)}, 1: {'kernel': np.ones(4)}},
          'final_linears': {0: {'kernel': np.ones(1)}}, 'y_embedder': {'embedding': np.ones(5)}}
  tuned = copy.deepcopy(init)
  tuned['blocks']['b'] = np.full(3, 0.6)          # ||delta|| = sqrt(3 * 0.36), ||init|| = sqrt(6)
  tuned['x_embedders'][1]['kernel'] = np.full(4, 1.5)  # 0.5 * 2 / 2
  got = mini_repro.param_change(init, tuned)
  assert got.keys() == {'blocks', 'embed[0]', 'embed[1]', 'de-embed[0]', 'y_embedder'}
  np.testing.assert_allclose(got['blocks'], np.sqrt(3 * 0.36 / 6))
  np.testing.assert_allclose(got['embed[1]'], 0.5)
  assert got['embed[0]'] == got['de-embed[0]'] == got['y_embedder'] == 0.0


def test_only_sit_extends_the_plateau_history(tmp_path):
  config = config_lib.load_config('mini_repro:converged_quick')
  config.mini_repro.update(plateau_every=2, max_steps=2, patience=2)
  first = mini_repro.only_sit(str(tmp_path), config)
  assert [h['step'] for h in first['plateau']] == [2]
  assert first['plateau_stop'] == 'max_steps=2 reached before a plateau'
  config.mini_repro.max_steps = 4  # a larger budget continues from the last check
  second = mini_repro.only_sit(str(tmp_path), config)
  assert [h['step'] for h in second['plateau']] == [2, 4]
  assert second['plateau'][0] == first['plateau'][0]
  assert not list(tmp_path.glob('ppf*'))  # no fine-tunes


def test_only_sit_needs_the_plateau_loop(tmp_path):
  config = config_lib.load_config('mini_repro:quick')
  with pytest.raises(errors.UserError, match='--only_sit needs the plateau loop'):
    mini_repro.only_sit(str(tmp_path), config)


def test_recipe_table_puts_each_runs_recipe_next_to_its_shortest_finetune():
  def result(lr, warmup, ema, fids):
    rows = [dict(stages=1, train_steps=100, finetune_steps=0, seed=0, fid=10.0, recall=0.5)]
    rows += [dict(stages=k, train_steps=100 + ft, finetune_steps=ft, seed=seed,
                  fid=fids[k] + ft + seed, recall=0.25) for k in (2, 3) for ft in (10, 20)
             for seed in (0, 1)]
    return dict(rows=rows, finetune_steps=[10, 20], seeds=[0, 1],
                config=dict(train=dict(lr=1e-3), mini_repro=dict(
                    finetune_lr=lr, finetune_warmup_fraction=warmup, finetune_ema_decay=ema)))
  table = mini_repro.recipe_table([result(0.0, 0.25, 0.95, {2: 20.0, 3: 30.0}),
                                   result(3e-4, 0.0, 0.99, {2: 40.0, 3: 50.0})])
  assert table.startswith('The SiT they start from (100 steps): FID 10.00, recall 0.500.')
  assert '| 0.001 | 25% | 0.95 | 10 | 30.00 | 0.250 | 40.00 | 0.250 |' in table  # lr 0: SiT's
  assert '| 0.0003 | 0% | 0.99 | 10 | 50.00 | 0.250 | 60.00 | 0.250 |' in table
