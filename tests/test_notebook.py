"""The Colab sampling notebook (launch/colab_sampling.ipynb): stored clean, and it runs end to end.

The run executes every cell on CPU with `PPFLOW_NOTEBOOK_TINY=1`: a tiny random SiT written to a
.pt file and imported, PPF initialised from it, a tiny random diffusers VAE, both samplers timed.
"""

from __future__ import annotations

import os
import re

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'launch', 'colab_sampling.ipynb')


def test_notebook_is_stored_clean():
  nb = nbformat.read(NOTEBOOK, as_version=nbformat.NO_CONVERT)
  assert nb.nbformat == 4
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(c.outputs == [] and c.execution_count is None for c in code), 'outputs are stored'
  params = code[0]
  assert 'parameters' in params.metadata.get('tags', [])
  assert re.search(r'^TINY = False$', params.source, re.M), 'TINY must default to False'
  for name in ('PPF_CONFIG', 'SIT_CONFIG', 'SIT_WEIGHTS', 'PPF_WEIGHTS', 'VAE_PATH', 'CLASSES',
               'NUM_STEPS', 'PPF_CFG', 'SIT_CFG', 'REPO_URL'):
    assert re.search(rf'^{name} = ', params.source, re.M), f'parameter {name} missing'


def _outputs(nb) -> tuple[str, list[str]]:
  """All stream text of an executed notebook, and the MIME types of its rich outputs."""
  text, mimes = [], []
  for cell in nb.cells:
    for out in cell.get('outputs', []):
      if out.output_type == 'stream':
        text.append(out.text)
      elif out.output_type in ('display_data', 'execute_result'):
        mimes.extend(out.data)
  return ''.join(text), mimes


def test_notebook_runs_tiny(monkeypatch):
  monkeypatch.setenv('PPFLOW_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=180, kernel_name='python3',
                          resources={'metadata': {'path': ROOT}})
  client.execute()  # raises CellExecutionError with the traceback if a cell fails

  text, mimes = _outputs(nb)
  assert 'install skipped' in text
  assert 'PPF: initialised from the SiT weights' in text
  assert 'tiny-vae' in text  # the VAE decode path ran
  for name in ('ppf_xl_2', 'sit_xl_2'):
    m = re.search(rf'^{name} \(tiny\): (\d+\.\d+) s per grid of 4 images \(median of 1; '
                  r'warm-up (\d+\.\d+) s excluded\)$', text, re.M)
    assert m, f'no timing line for {name} in:\n{text}'
    assert float(m[1]) > 0 and float(m[2]) > 0
  assert re.search(r'^measured speed-up ppf_xl_2 \(tiny\) vs sit_xl_2 \(tiny\): \d+\.\d+x$',
                   text, re.M), text
  # 4x4 patches on the first half: fewer FLOPs than SiT, never more than 4x fewer.
  bound = float(re.search(r'FLOPs bound for this run \(CFG passes counted\): (\d+\.\d+)x',
                          text)[1])
  testing = float(re.search(r"paper's Testing FLOPs of ppf_xl_2 \(tiny\): (\d+\.\d+)%", text)[1])
  assert 1.0 < bound < 4.0
  assert 25.0 < testing < 100.0
  assert 'image/png' in mimes  # the two grids

