"""Test-session environment and fixtures (helpers live in tests/helpers.py, imported as a package)."""

import os

import pytest

# The tests run on CPU; libtpu (requirements-test.txt) is there for ahead-of-time TPU compiles
# (test_aot.py), which need no TPU backend.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from tests.helpers import tiny_config  # noqa: E402  (after the platform is set)


@pytest.fixture
def tiny():
  return tiny_config
