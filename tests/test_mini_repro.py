"""The mini reproduction (mini_repro.py) end to end with configs/mini_repro.py:quick: three models
trained and fine-tuned from SiT, sampled side by side, scored and tabulated."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from flax import traverse_util

from ppflow_jax import checkpoint, config_lib, flops, sampling
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

  rows = {r['stages'] if r['train_steps'] else 0: r for r in result['rows']}
  assert sorted(rows) == [0, 1, 2, 3]
  sit_steps = config.train.steps
  assert result['finetune_steps'] == mini_repro.finetune_steps(config) == max(1, sit_steps // 10)
  assert rows[1]['train_steps'] == sit_steps
  assert rows[2]['train_steps'] == rows[3]['train_steps'] == sit_steps + result['finetune_steps']
  # FLOPs: SiT is the reference; PPF-3 is cheaper than PPF-2, both recomputed independently.
  assert rows[1]['flops_ratio'] == 1.0 and rows[1]['speedup'] == 1.0
  for k in (2, 3):
    cfg = mini_repro.make_config(config, k, finetune=True)
    assert rows[k]['flops_ratio'] == flops.testing_flops_ratio(
        cfg, sampling.SamplerSpec.from_config(cfg))
    assert sum(rows[k]['evaluations']) == config.sample.num_steps - 1  # Euler: one per step
  assert rows[3]['flops_ratio'] < rows[2]['flops_ratio'] < 1.0
  for k in (1, 2, 3):
    assert rows[k]['seconds_per_batch'] > 0 and np.isfinite(rows[k]['fid'])
    assert 0 <= rows[k]['precision'] <= 1 and 0 <= rows[k]['recall'] <= 1
  table = open(os.path.join(workdir, 'results.md')).read()
  assert table.count('| PPF-') == 2 and '| SiT (2x2) |' in table

  # The fine-tunes started from the paper's initialisation of the SiT's EMA weights: the
  # transformer blocks of the saved init equal the SiT's.
  sit_cfg = mini_repro.make_config(config, 1, finetune=False)
  ppf_cfg = mini_repro.make_config(config, 2, finetune=True)
  from ppflow_jax import sharding  # pylint: disable=g-import-not-at-top
  sit = checkpoint.restore_for_inference(os.path.join(workdir, 'sit'), sit_cfg,
                                         sharding.make_mesh(sit_cfg))
  init = checkpoint.load_params(os.path.join(workdir, 'ppf2_init'), ppf_cfg,
                                sharding.make_mesh(ppf_cfg))
  sit_flat = traverse_util.flatten_dict(sit.ema)
  init_flat = traverse_util.flatten_dict(init)
  blocks = [p for p in sit_flat if p[0] == 'blocks']
  assert blocks
  for p in blocks:
    np.testing.assert_array_equal(np.asarray(init_flat[p]), np.asarray(sit_flat[p]))
  assert int(sit.step) == sit_steps
