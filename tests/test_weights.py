"""Weights by name: registry addresses, cache, resumable download, size/hash checks (local server)."""

from __future__ import annotations

import hashlib
import os

import pytest

from http_server import Files, serve
from ppflow_jax import weights

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv('PPFLOW_CACHE', str(tmp_path / 'cache'))
  return tmp_path / 'cache'


def test_registry_names_the_upstream_files():
  assert set(weights.REGISTRY) == {'PPF-XL-2.pt', 'PPF-XL-3.pt', 'SiT-XL-2-256x256.pt',
                                   'DiT-XL-2-256x256.pt'}
  assert weights.release('ppf-xl-2') is weights.REGISTRY['PPF-XL-2.pt']
  assert weights.REGISTRY['DiT-XL-2-256x256.pt'].url.endswith('/DiT/models/DiT-XL-2-256x256.pt')
  for r in weights.REGISTRY.values():
    assert r.url.startswith('https://') and 'dl=0' not in r.url


def _local_release(monkeypatch, url, **kw):
  entry = weights.Release('PPF-XL-2.pt', url, 'ppf_xl_2', **kw)
  monkeypatch.setitem(weights.REGISTRY, 'PPF-XL-2.pt', entry)


def test_download_by_name_resumes_and_caches(cache, monkeypatch):
  files = Files({'/PPF-XL-2.pt': PAYLOAD})
  files.cut_after['/PPF-XL-2.pt'] = 300_000  # the first reply stops early
  with serve(files) as base:
    _local_release(monkeypatch, base + '/PPF-XL-2.pt?dl=1', size=len(PAYLOAD),
                   sha256=hashlib.sha256(PAYLOAD).hexdigest())
    with pytest.raises(weights.DownloadError, match='run the same command again to resume'):
      weights.resolve('PPF-XL-2', progress=False)
    assert os.path.getsize(cache / 'PPF-XL-2.pt.part') == 300_000
    path = weights.resolve('PPF-XL-2', progress=False)  # resumes with a Range request
    assert open(path, 'rb').read() == PAYLOAD
    assert files.requests[-1] == ('/PPF-XL-2.pt', 'bytes=300000-')
    n = len(files.requests)
    assert weights.resolve('PPF-XL-2.pt', progress=False) == path  # cached: no request
    assert len(files.requests) == n
  assert (cache / 'PPF-XL-2.pt.sha256').read_text().strip() == hashlib.sha256(PAYLOAD).hexdigest()


def test_hash_mismatch_is_refused_and_removed(cache, monkeypatch):
  with serve(Files({'/PPF-XL-2.pt': PAYLOAD})) as base:
    _local_release(monkeypatch, base + '/PPF-XL-2.pt', sha256='0' * 64)
    with pytest.raises(weights.DownloadError, match='SHA-256 differs'):
      weights.resolve('PPF-XL-2.pt', progress=False)
  assert not os.listdir(cache)


def test_cached_file_changed_after_download_is_refused(cache, monkeypatch):
  with serve(Files({'/f.pt': PAYLOAD})) as base:
    path = weights.resolve(base + '/f.pt', progress=False)
  with open(path, 'r+b') as f:
    f.write(b'x')
  with pytest.raises(weights.DownloadError, match='no longer matches its SHA-256'):
    weights.resolve(base + '/f.pt', progress=False)


def test_unknown_name_and_missing_url(cache):
  with pytest.raises(weights.errors.UserFileError, match='PPF-XL-3.pt'):
    weights.resolve('PPF-XL-9.pt')
  with serve(Files({})) as base:
    with pytest.raises(weights.DownloadError, match='HTTP 404'):
      weights.resolve(base + '/nothing.pt', progress=False)


def test_existing_path_is_returned_unchanged(tmp_path):
  f = tmp_path / 'mine.pt'
  f.write_bytes(b'x')
  assert weights.resolve(str(f)) == str(f)
