"""Schedule search: candidates (regime restriction), FLOPs ratios, proxy scoring, Pareto front, and
the whole search on a tiny model (confirmed side by side, chosen within the budget, outputs)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from ppflow_jax import config_lib, flops, inference, sampling
from ppflow_jax import schedule_search as ss
from ppflow_jax.models import build_model
from tests.helpers import tiny_config


def config_for(regime, num_stages=2):
  c = tiny_config(num_stages)
  c.train.regime = regime
  c.sample.update(num_steps=5, batch_size=4)
  return config_lib.resolve(c)


def test_candidates_follow_the_regime():
  flexi = ss.enumerate_candidates(config_for('flexidit', 3), 0.25, 3)
  # 1 stage: 3 patches; 2 stages: 3 pairs x 3 boundaries; 3 stages: 1 triple x 3 pairs.
  assert len(flexi) == 3 + 9 + 3
  own = ss.enumerate_candidates(config_for('ppflow', 3), 0.25, 3)
  assert own == [ss.Candidate((0, 1, 2), (0.5, 0.75))]  # only the trained ranges fit
  assert not ss.in_trained_ranges(config_for('ppflow', 3), ss.Candidate((2,), ()))


def test_flops_ratio_matches_flops_py():
  config = config_for('flexidit')
  own = ss.Candidate((0, 1), (0.5,))
  assert ss.flops_ratio(config, own) == pytest.approx(flops.testing_flops_ratio(config))
  assert ss.flops_ratio(config, ss.Candidate((1,), ())) == pytest.approx(1.0)
  assert ss.flops_ratio(config, ss.Candidate((0,), ())) < ss.flops_ratio(config, own) < 1.0


def test_proxy_uses_each_times_stage_and_pareto_front():
  times = (np.arange(4) + 0.5) / 4
  errors = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
  assert ss.proxy_score(ss.Candidate((0, 1), (0.5,)), errors, times) == pytest.approx(0.75)
  assert ss.proxy_score(ss.Candidate((0,), ()), errors, times) == pytest.approx(2.5)
  assert ss.pareto_front([(0.3, 5.0), (0.5, 1.0), (0.4, 6.0), (1.0, 0.0)]) == [0, 1, 3]


class MeanAbsEvaluator:
  """Stands in for the FID evaluator: the samples' mean absolute value (differs per seed)."""

  def score(self, images, labels):
    return {'fid': float(np.abs(images).mean())}


def test_budget_names_and_bad_budget():
  config = config_for('flexidit', 3)
  hand = ss.hand_set(config)
  assert sorted(hand) == ['PPF-2', 'PPF-3'] and hand['PPF-2'].stages == (0, 2)
  finest = ss.finest_reference_flops(config)
  assert ss.budget_ratio(config, 'PPF-3', hand, finest) == pytest.approx(
      flops.testing_flops_ratio(config))
  assert ss.budget_ratio(config, 0.4, hand, finest) == 0.4
  with pytest.raises(ValueError, match="--budget='PPF-4' is neither a number nor one of"):
    ss.budget_ratio(config, 'PPF-4', hand, finest)
  # Priced as run, a hand-set budget counts its CFG passes as the samplers make them.
  as_run = ss.finest_reference_flops(config, 'flops_with_cfg')
  assert ss.budget_ratio(config, 'PPF-3', hand, as_run, 'flops_with_cfg') == pytest.approx(
      flops.testing_flops_ratio(config, cfg=True))
  with pytest.raises(ValueError, match="price='free' is not one of"):
    ss.SearchSettings(price='free')


def test_search_on_a_tiny_model(tmp_path):
  config = config_for('flexidit')
  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: 0.05 * rng.standard_normal(a.shape).astype(a.dtype), params)
  model = inference.Inference.from_params(config, params)
  images = rng.uniform(-1, 1, (8, 16, 16, 2)).astype(np.float32)
  labels = np.arange(8) % 5
  # Two budgets with the same value (this model's own schedule is PPF-2): one shared search.
  settings = ss.SearchSettings(budget=('hand', 'PPF-2'), grid=0.25, num_times=8, proxy_images=8,
                               confirm=1, num_samples=4, timing_repeats=1, sampling_seeds=(0, 1))
  result = ss.search(model, (images, labels), settings, evaluator=MeanAbsEvaluator())
  rows = result['confirmed']
  hand = [n for n in rows if n.startswith('hand-set PPF-2')]
  at_hand, at_ppf2 = result['budgets']
  chosen = rows[at_hand['chosen']]
  assert len(hand) == 1 and at_hand['chosen'].startswith('searched #1 at hand')
  assert at_ppf2['chosen'].startswith('searched #1 at PPF-2')
  # The default price counts CFG passes as run: the budget and the rows alike.
  assert at_hand['ratio'] == at_ppf2['ratio'] == pytest.approx(
      flops.testing_flops_ratio(config, cfg=True))
  assert chosen['flops_ratio'] <= at_hand['ratio'] + 1e-9
  assert chosen['flops_ratio'] == pytest.approx(chosen['flops_ratio_with_cfg'])
  # The hand-set schedule is on the grid, so the searched one is at least as good by the proxy.
  assert chosen['proxy'] <= rows[hand[0]]['proxy']
  assert rows[hand[0]]['flops_ratio_with_cfg'] == pytest.approx(
      flops.testing_flops_ratio(config, cfg=True))
  # The same schedule searched under both budgets is sampled once; each seed has its own noise.
  assert rows[at_ppf2['chosen']]['same_schedule_as'] == at_hand['chosen']
  assert rows[at_ppf2['chosen']]['fid_per_seed'] == chosen['fid_per_seed']
  fids = rows[hand[0]]['fid_per_seed']
  assert len(fids) == 2 and fids[0] != fids[1]
  assert rows[hand[0]]['fid'] == pytest.approx(np.mean(fids))
  assert rows[hand[0]]['fid_std'] == pytest.approx(np.std(fids, ddof=1))
  assert all(r['batch_seconds'] > 0 for r in rows.values())
  assert 'any schedule' in result['restriction']
  assert ss.markdown(result).count('\n| ') == len(rows) + 1
  assert '| FLOPs as run (CFG passes) / finest |' in ss.markdown(result)
  ss.pareto_plot(result, str(tmp_path / 'pareto.png'))
  assert (tmp_path / 'pareto.png').stat().st_size > 1000
  json.dumps(result)
  # A candidate sampled through StageMap equals the model's own sampler on its own schedule.
  own_sampler, state = ss.candidate_sampler(model, ss.Candidate((0, 1), (0.5,)))
  x0, y = jax.random.normal(jax.random.key(0), (2, 16, 16, 2)), np.array([1, 2])
  np.testing.assert_allclose(own_sampler.sample(state, x0, y),
                             model.sampler().sample(model.params, x0, y), rtol=1e-5, atol=1e-5)
  assert sampling.SamplerSpec.from_config(config).num_steps == own_sampler.spec.num_steps
