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


# The import order, bottom first: a module may import its own layer and those below, never one
# above (README "What is where"). Entries are module names or packages (prefix + '.').
LAYERS = (
    ('ppflow_jax.stages', 'ppflow_jax.sharding', 'ppflow_jax.ops.', 'ppflow_jax.config_lib',
     'ppflow_jax.errors', 'ppflow_jax.paths', 'ppflow_jax.hlo', 'ppflow_jax.lease'),
    ('ppflow_jax.models.', 'ppflow_jax.flow', 'ppflow_jax.packing', 'ppflow_jax.cli',
     'ppflow_jax.weights'),
    ('ppflow_jax.sampling', 'ppflow_jax.adaptive', 'ppflow_jax.train', 'ppflow_jax.data.', 'ppflow_jax.convert.',
     'ppflow_jax.evaluation.metrics', 'ppflow_jax.evaluation.inception',
     'ppflow_jax.evaluation.fmnist_features'),
    ('ppflow_jax.flops', 'ppflow_jax.checkpoint', 'ppflow_jax.bench.common'),
    ('ppflow_jax.inference',),
    ('ppflow_jax.report', 'ppflow_jax.loop', 'ppflow_jax.summary', 'ppflow_jax.evaluation.'),
    ('ppflow_jax.main', 'ppflow_jax.sample', 'ppflow_jax.aot', 'ppflow_jax.schedule_search', 'ppflow_jax.tables', 'ppflow_jax.convert.__main__', 'ppflow_jax.bench.', 'ppflow_jax.experiments.'),
)


def _layer(module: str) -> int:
  """The layer of `module` (the most specific matching entry wins)."""
  best = None
  for i, entries in enumerate(LAYERS):
    for e in entries:
      if module == e.rstrip('.') or (e.endswith('.') and module.startswith(e)):
        if best is None or len(e) > best[1]:
          best = (i, len(e))
  assert best is not None, f'{module} is in no layer of tests/test_layout.py'
  return best[0]


def _imports(path: str, module: str) -> set[str]:
  """ppflow_jax modules imported anywhere in the file (function-level imports included)."""
  import ast  # pylint: disable=g-import-not-at-top
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      base = node.module
      if node.level:  # relative: resolve against the package
        base = '.'.join(module.split('.')[:-node.level] + [node.module])
      # `from pkg import module` imports the module; `from module import name`, the module.
      out.update(f'{base}.{a.name}' if _is_module(f'{base}.{a.name}') else base
                 for a in node.names)
  return {m for m in out if m.startswith('ppflow_jax.') and _is_module(m)}


def _is_module(name: str) -> bool:
  rel = os.path.join(ROOT, *name.split('.'))
  return os.path.isfile(rel + '.py') or os.path.isfile(os.path.join(rel, '__init__.py'))


def test_no_module_imports_one_above_it():
  violations = []
  package = os.path.join(ROOT, 'ppflow_jax')
  for folder, _, files in os.walk(package):
    for f in files:
      if not f.endswith('.py'):
        continue
      path = os.path.join(folder, f)
      parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
      if parts[-1] == '__init__':
        parts = parts[:-1]
      module = '.'.join(parts)
      if module == 'ppflow_jax':
        continue
      for imported in _imports(path, module):
        if _layer(imported) > _layer(module):
          violations.append(f'{module} (layer {_layer(module)}) imports {imported} '
                            f'(layer {_layer(imported)})')
  assert not violations, '\n'.join(violations)
