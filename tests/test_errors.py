"""User mistakes give one `error:` line and exit status 2: every row of docs/errors.md is run.

The table's commands run in one interpreter (tests/cli_cases.py) from a scratch directory
holding the bad files the rows name (`bad/...`); each printed message must equal the table's.
Weight-file diagnoses are also checked directly on .pt and .safetensors files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from ppflow_jax import cli
from ppflow_jax.convert import torch_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, 'docs', 'errors.md')
PREFIX = 'python -m '


def doc_rows() -> list[tuple[str, str]]:
  """(command, message) of every row of the table in docs/errors.md."""
  rows = []
  with open(DOC) as f:
    for line in f:
      m = re.match(r'^\| `(python -m ppflow_jax\.(?:main|evaluation\.evaluate) [^`]*)` \| '
                   r'`(error: [^`]*)` \|$', line.strip())
      if m:
        rows.append((m[1], m[2]))
  return rows


class _Reducer:
  def __reduce__(self):
    return (os.system, ('true',))


def write_bad_files(bad: str) -> None:
  """The files the table's rows name: empty, truncated, an HTML page, a CRC failure, a pickle
  that runs code, a whole file to damage, and an ADM reference batch (statistics only) for the
  evaluator's rows."""
  import torch  # pylint: disable=g-import-not-at-top
  os.makedirs(bad)
  good = os.path.join(bad, 'good.pt')
  torch.save({'w': torch.arange(4096, dtype=torch.float32)}, good)
  data = open(good, 'rb').read()
  with open(os.path.join(bad, 'empty.pt'), 'wb'):
    pass
  with open(os.path.join(bad, 'truncated.pt'), 'wb') as f:
    f.write(data[:len(data) // 2])
  with open(os.path.join(bad, 'page.pt'), 'wb') as f:
    f.write(b'<!DOCTYPE html><html><body>Sign in to download</body></html>')
  with zipfile.ZipFile(good) as z:  # flip one byte inside the tensor data: only the CRC notices
    info = next(i for i in z.infolist() if i.filename.endswith('/data/0'))
  offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100
  damaged = bytearray(data)
  damaged[offset] ^= 0xFF
  with open(os.path.join(bad, 'crc.pt'), 'wb') as f:
    f.write(bytes(damaged))
  torch.save({'w': torch.zeros(2), 'x': _Reducer()}, os.path.join(bad, 'unsafe.pt'))
  np.savez(os.path.join(bad, 'ref.npz'), mu=np.zeros(2), sigma=np.eye(2), mu_s=np.zeros(2),
           sigma_s=np.eye(2))


@pytest.fixture(scope='module')
def table_results(tmp_path_factory):
  """Runs every documented command once; returns {command: (exit status, stderr)}."""
  scratch = str(tmp_path_factory.mktemp('errors'))
  write_bad_files(os.path.join(scratch, 'bad'))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
  by_module = {}
  for cmd, _ in doc_rows():
    case = shlex.split(cmd[len(PREFIX):])
    by_module.setdefault(case[0], []).append((cmd, case))
  out = {}
  for module, rows in by_module.items():  # one interpreter per command
    with open(os.path.join(scratch, 'cases.json'), 'w') as f:
      json.dump([case for _, case in rows], f)
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'cli_cases.py'),
                        'cases.json'], cwd=scratch, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    out.update({cmd: (r['code'], r['stderr'].replace(scratch, '.'))
                for (cmd, _), r in zip(rows, results)})
  return out


def test_table_has_enough_rows():
  assert len(doc_rows()) >= 12


@pytest.mark.parametrize('command, message', doc_rows())
def test_documented_message(table_results, command, message):
  code, stderr = table_results[command]
  lines = [l for l in stderr.splitlines() if l.strip()]
  assert code == 2, stderr
  assert 'Traceback' not in stderr, stderr
  assert lines[-1] == message, f'printed:\n{stderr}'


@pytest.mark.parametrize('name, kind', [
    ('empty.pt', torch_io.EmptyWeightFileError),
    ('truncated.pt', torch_io.TruncatedWeightFileError),
    ('page.pt', torch_io.CorruptWeightFileError),
    ('crc.pt', torch_io.CorruptWeightFileError),
    ('unsafe.pt', torch_io.UnsafeCheckpointError),
])
def test_weight_file_kinds(tmp_path, name, kind):
  """The same diagnosis from the reader and from the VAE and Inception importers built on it."""
  from ppflow_jax.convert import inception, vae  # pylint: disable=g-import-not-at-top
  write_bad_files(str(tmp_path / 'bad'))
  path = str(tmp_path / 'bad' / name)
  messages = set()
  for load in (torch_io.read_state_dict, vae.load_diffusers_vae,
               inception.load_pytorch_fid_weights):
    with pytest.raises(kind) as e:
      load(path)
    assert path in str(e.value)
    messages.add(str(e.value))
  assert len(messages) == 1
  assert torch_io.read_state_dict(str(tmp_path / 'bad' / 'good.pt'))['w'].shape == (4096,)


def test_safetensors_kinds(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  good = str(tmp_path / 'w.safetensors')
  save_file({'w': np.ones((64, 64), np.float32)}, good)
  data = open(good, 'rb').read()
  cases = {'empty': (b'', torch_io.EmptyWeightFileError),
           'short': (data[:-100], torch_io.TruncatedWeightFileError),
           'header': (data[:8] + b'x' * (len(data) - 8), torch_io.CorruptWeightFileError),
           'html': (b'<html>' + data, torch_io.CorruptWeightFileError)}
  for name, (content, kind) in cases.items():
    path = tmp_path / f'{name}.safetensors'
    path.write_bytes(content)
    with pytest.raises(kind, match=re.escape(str(path))):
      torch_io.read_state_dict(str(path))
  assert torch_io.read_state_dict(good)['w'].shape == (64, 64)


def test_internal_faults_are_not_user_errors():
  try:
    np.zeros(3).reshape(2)  # a ValueError raised by numpy, not by one of our checks
  except ValueError as e:
    assert not cli.is_user_error(e)
  try:
    torch_io.read_state_dict('/nonexistent/file.pt')
  except FileNotFoundError as e:
    assert cli.is_user_error(e)
