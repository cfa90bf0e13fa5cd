"""Test-session environment (helpers live in tests/helpers.py and are imported as a package)."""

import os

# The tests run on CPU; libtpu (requirements-test.txt) is there for ahead-of-time TPU compiles
# (test_aot.py), which need no TPU backend.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
