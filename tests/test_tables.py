"""README/docs tables of measured results equal what their committed JSON files render to."""

from __future__ import annotations

import os
import shutil

import pytest

from ppflow_jax import tables


def test_every_generated_table_matches_its_json():
  assert tables.differences() == []


def test_no_hand_copied_table_outside_markers(tmp_path):
  assert tables.unmarked_copies() == []
  _copy_docs(tmp_path)
  header = tables.render(tables.TABLES[0], str(tmp_path)).splitlines()[0]
  (tmp_path / 'docs' / 'copy.md').write_text(f'intro\n{header}\n')
  assert [d.split(':')[0] for d in tables.unmarked_copies(str(tmp_path))] == ['docs/copy.md']


def _copy_docs(tmp_path):
  for t in tables.TABLES:
    for rel in (t.artifact,) + t.docs:
      os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
      source = os.path.join(tables.ROOT, rel)
      if os.path.isdir(source):  # a folder of result files (docs/tpu_aot)
        shutil.copytree(source, tmp_path / rel, dirs_exist_ok=True)
      else:
        shutil.copy(source, tmp_path / rel)


def test_a_changed_number_is_caught_and_rewritten(tmp_path):
  """Editing one number of a generated README table by hand fails the check; write() restores."""
  _copy_docs(tmp_path)
  readme = tmp_path / 'README.md'
  text = readme.read_text()
  start = text.index('<!-- table: default_report')
  row = text.index('| PPF (stage schedule) |', start)
  cell = text.index('|', text.index('|', row + 1) + 1) - 1  # end of the s / batch cell
  edited = text[:row] + text[row:cell].replace('.', '.9', 1) + text[cell:]
  assert edited != text
  readme.write_text(edited)
  assert any('default_report' in d for d in tables.differences(str(tmp_path)))
  tables.write(str(tmp_path))
  assert readme.read_text() == text and tables.differences(str(tmp_path)) == []


def test_missing_markers_are_reported(tmp_path):
  _copy_docs(tmp_path)
  (tmp_path / 'docs' / 'variants.md').write_text('no table here\n')
  with pytest.raises(ValueError, match='docs/variants.md has no block'):
    tables.differences(str(tmp_path))


def test_mini_repro_tables_stay_separate_markdown_tables():
  row = dict(model='SiT (4x4)', stages=1, train_steps=100, finetune_steps=0, seed=0,
             fid_floor_n=9.0, fid=10.0, precision=0.5, recall=0.25, seconds_per_batch=2.0,
             speedup=1.0, flops_ratio=1.0, timed_batches=2)
  result = dict(rows=[row], sampler='heun', num_samples=20, sample_batch=10, device='cpu',
                floor_samples=10, classifier_test_accuracy=0.9, seeds=[0],
                plateau=[dict(step=50, loss=0.5, fid=12.0)], plateau_every=50,
                plateau_stop='max_steps=50 reached before a plateau')
  body = tables.mini_repro_table(result)
  blocks = body.split('\n\n')
  assert [b.splitlines()[0].split(' | ')[0] for b in blocks] == ['| model', '| SiT step']
  assert all(line.startswith('|') for b in blocks for line in b.splitlines())
