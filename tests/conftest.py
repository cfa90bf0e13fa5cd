"""Shared fixtures: tiny configs that compile and run in seconds on CPU."""

from __future__ import annotations

import os
import sys

# Tests that need several devices run in subprocesses with their own XLA_FLAGS.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests run on CPU; libtpu (requirements-test.txt) is there for ahead-of-time TPU compiles
# (test_aot.py), which need no TPU backend.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, ROOT)

import pytest  # noqa: E402

from ppflow_jax import config_lib  # noqa: E402


def tiny_config(num_stages: int = 2, *, hw: int = 16, channels: int = 2, learn_sigma: bool = True,
                patch_sizes=None, boundaries=None, cfg_scales=None):
  """A 2-block, 32-wide PPF on a (hw, hw, channels) latent with the paper's schedule."""
  c = config_lib.base_config()
  c.model.update(config_lib.model_config('S', depth=2, hidden_size=32, num_heads=2,
                                         num_classes=5, learn_sigma=learn_sigma))
  c.latent.update(height=hw, width=hw, channels=channels)
  config_lib.set_schedule(c, num_stages, cfg_scales or (1.0, 2.0, 3.0, 3.0, 3.0)[:num_stages])
  if patch_sizes is not None:
    c.schedule.patch_sizes = patch_sizes
  if boundaries is not None:
    c.schedule.boundaries = boundaries
  c.data.source = 'fashion_mnist'
  c.train.update(batch_size=8, steps=10)
  return config_lib.resolve(c)


@pytest.fixture
def tiny():
  return tiny_config
