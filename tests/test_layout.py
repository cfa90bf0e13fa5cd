"""The package's layout rules: every module imports beside every other, and defines no
command-line flag on import (flags live in entry points, under `__main__` or in `main()`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.helpers import ROOT

_SCRIPT = textwrap.dedent('''
  import importlib, pkgutil
  from absl import flags
  import ppflow_jax
  names = sorted(m.name for m in pkgutil.walk_packages(ppflow_jax.__path__, 'ppflow_jax.')
                 if not m.name.endswith('__main__'))
  for name in names:
    importlib.import_module(name)
  ours = {m: [f.name for f in fl] for m, fl in flags.FLAGS.flags_by_module_dict().items()
          if 'ppflow_jax' in m}
  assert not ours, f'flags defined on import: {ours}'
  print(len(names))
''')


def test_every_module_imports_together_without_defining_flags():
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  p = subprocess.run([sys.executable, '-c', _SCRIPT], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert int(p.stdout.split()[-1]) > 40  # the walk found the whole package
