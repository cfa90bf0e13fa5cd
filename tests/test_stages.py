"""Stage schedule: validation errors, boundary lookup, bucket sizes."""

from __future__ import annotations

import pytest

from ppflow_jax import config_lib, stages
from tests.helpers import tiny_config


def test_paper_schedules_and_boundary_lookup():
  s = stages.from_config(tiny_config(3, hw=32))
  assert [st.patch for st in s.stages] == [(4, 4), (2, 4), (2, 2)]
  assert [s.num_tokens(i) for i in range(3)] == [64, 128, 256]
  assert s.token_grid(1) == (16, 8)  # the paper's "4x2" is 2 rows x 4 columns
  # A time on a boundary belongs to the coarser stage, as in the official sampler.
  assert [s.stage_index(t) for t in (0.0, 0.5, 0.5001, 0.75, 0.7501, 1.0)] == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize('batch, expected', [(256, (128, 128)), (8, (4, 4)), (7, (4, 3))])
def test_bucket_sizes_two_stages(batch, expected):
  assert stages.from_config(tiny_config(2)).bucket_sizes(batch) == expected


def test_bucket_sizes_three_stages_and_too_small_batch():
  s = stages.from_config(tiny_config(3))
  assert s.bucket_sizes(256) == (128, 64, 64)
  assert sum(s.bucket_sizes(10)) == 10
  with pytest.raises(ValueError, match='every stage needs at least one sample'):
    s.bucket_sizes(2)


@pytest.mark.parametrize('field, value, message', [
    ('boundaries', (0.6, 0.5), 'strictly increasing'),
    ('boundaries', (0.0, 0.5), 'inside \\(0, 1\\)'),
    ('boundaries', (0.5, 1.0), 'inside \\(0, 1\\)'),
    ('boundaries', (0.5,), '3 patch sizes but 1 boundaries'),
    ('patch_sizes', ((3, 3), (2, 4), (2, 2)), 'does not divide the 16x16 latent'),
    ('patch_sizes', ((2, 2), (4, 4), (2, 2)), 'as fine as the last stage'),
    ('patch_sizes', ((8, 8), (2, 4), (4, 4)), 'not a multiple of the finest patch'),
    ('patch_sizes', ((4, 4), (2,), (2, 2)), '\\(rows, cols\\) pair'),
    ('cfg_scales', (1.0, 2.0), '3 patch sizes but 2 cfg_scales'),
])
def test_schedule_validation_errors(field, value, message):
  c = tiny_config(3)
  c.schedule[field] = value
  with pytest.raises(ValueError, match=message):
    config_lib.resolve(c)


def test_negative_cfg_scale_rejected():
  c = tiny_config(2)
  c.schedule.cfg_scales = (1.0, -2.0)
  with pytest.raises(ValueError, match='negative CFG scale'):
    config_lib.resolve(c)

