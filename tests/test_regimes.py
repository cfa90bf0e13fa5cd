"""Training regimes: each stage bucket's times follow the documented law (KS tests, 20k draws)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy import stats

from ppflow_jax import flow
from ppflow_jax import stages as stages_lib
from tests.helpers import tiny_config

N = 20_000


def draw(num_stages: int, regime: str, shift: float = 3.0, seed: int = 0):
  schedule = stages_lib.from_config(tiny_config(num_stages))
  sizes = (N,) * num_stages
  return schedule, [np.asarray(t, np.float64) for t in flow.sample_times(
      jax.random.key(seed), schedule, sizes, regime, shift)]


def lumina_cdf(s: float):
  """CDF of t = s u / (1 + (s - 1) u), u ~ U(0, 1): u = t / (s - (s - 1) t)."""
  return lambda t: np.clip(t / (s - (s - 1.0) * t), 0.0, 1.0)


@pytest.mark.parametrize('num_stages', [2, 3])
def test_ppflow_is_uniform_on_each_stage_range(num_stages):
  schedule, ts = draw(num_stages, 'ppflow')
  for stage, t in zip(schedule.stages, ts):
    assert t.min() >= stage.t_start and t.max() <= stage.t_end
    assert stats.kstest(t, stats.uniform(stage.t_start, stage.t_end - stage.t_start).cdf).pvalue > 1e-3
    # The law is the stage's own range, not the whole axis.
    assert stats.kstest(t, 'uniform').pvalue < 1e-6


@pytest.mark.parametrize('num_stages', [2, 3])
def test_flexidit_is_uniform_on_all_times_for_every_patch(num_stages):
  _, ts = draw(num_stages, 'flexidit')
  for t in ts:
    assert stats.kstest(t, 'uniform').pvalue > 1e-3


@pytest.mark.parametrize('num_stages,shift', [(2, 3.0), (3, 3.0), (2, 5.0)])
def test_lumina_is_shifted_per_patch(num_stages, shift):
  _, ts = draw(num_stages, 'lumina', shift)
  for i, t in enumerate(ts):
    s = flow.lumina_shift(i, num_stages, shift)
    assert stats.kstest(t, lumina_cdf(s)).pvalue > 1e-3
    assert stats.kstest(t, 'uniform').pvalue < 1e-6 or s == 1.0
  # Largest patch (stage 0) leans to noise (t near 0), smallest to data; middle is unshifted.
  means = [t.mean() for t in ts]
  assert means == sorted(means) and means[0] < 0.5 < means[-1]
  assert flow.lumina_shift(0, num_stages, shift) == pytest.approx(1 / shift)
  assert flow.lumina_shift(num_stages - 1, num_stages, shift) == pytest.approx(shift)


def test_lumina_with_unit_shift_is_flexidit():
  _, a = draw(2, 'lumina', 1.0)
  _, b = draw(2, 'flexidit')
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=1e-6)


def test_unknown_regime_is_rejected():
  with pytest.raises(ValueError, match='regime'):
    draw(2, 'uniform')


@pytest.mark.slow
def test_compare_quick_smoke(tmp_path):
  """The comparison of the regimes (and MPDiT) end to end at smoke-test size."""
  from ppflow_jax.experiments import compare  # pylint: disable=g-import-not-at-top
  rows = compare.run(str(tmp_path), quick=True)
  assert [r['variant'] for r in rows] == [v.name for v in compare.VARIANTS]
  assert all(np.isfinite(r['sample_batch_seconds']) for r in rows)
  assert (tmp_path / 'compare.md').exists() and (tmp_path / 'compare.json').exists()
