"""The run lease on a local disk and on a fake gs:// bucket (fsspec's in-memory filesystem behind
etils.epath, the path layer real buckets go through): refusal naming the holder, stale claims
(expired, or a dead process of this host), --force and the holder noticing it lost the lease,
two launches writing at the same moment, and a 2-process job where process 0 holds it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import fsspec  # noqa: F401  (registers fsspec.registry)
import pytest
from tests.helpers import ROOT
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

from ppflow_jax import lease as lease_lib


class FakeBucket(MemoryFileSystem):
  """gs:// served from memory (no gcsfs, no network)."""
  protocol = ('gs', 'gcs')
  store: dict = {}
  pseudo_dirs = ['']


@pytest.fixture(params=['local', 'gs'])
def workdir(request, tmp_path, monkeypatch):
  if request.param == 'local':
    yield str(tmp_path)
    return
  registry = sys.modules['fsspec.registry']._registry  # pylint: disable=protected-access
  for name in ('gs', 'gcs'):
    monkeypatch.setitem(registry, name, FakeBucket)
  cached = epath.backend.fsspec_backend._get_filesystem  # pylint: disable=protected-access
  cached.cache_clear()
  FakeBucket.store.clear()
  path = f'gs://bucket/{tmp_path.name}'
  assert isinstance(epath.Path(path)._backend.fs(path), FakeBucket)  # pylint: disable=protected-access
  yield path
  cached.cache_clear()


def claims(workdir) -> list[dict]:
  d = epath.Path(workdir) / lease_lib.LEASE_DIR
  return [json.loads(p.read_text()) for p in d.iterdir() if p.name.endswith('.json')]


def test_second_writer_refused_with_holder_then_released(workdir):
  with lease_lib.RunLease(workdir, expiry_s=600):
    [held] = claims(workdir)
    assert held['pid'] == os.getpid()
    with pytest.raises(lease_lib.LeaseHeldError) as e:
      lease_lib.RunLease(workdir, expiry_s=600).acquire()
    msg = str(e.value)
    assert '\n' not in msg
    assert f'host {held["host"]}, pid {os.getpid()}, started ' in msg and 'UTC' in msg, msg
    assert '--force' in msg and 'expires at' in msg
    assert len(claims(workdir)) == 1  # the refused launch left nothing behind
  assert claims(workdir) == []
  with lease_lib.RunLease(workdir, expiry_s=600):  # free again
    assert len(claims(workdir)) == 1


def test_refresh_moves_the_expiry(workdir):
  lease = lease_lib.RunLease(workdir, expiry_s=600)
  lease.acquire()
  try:
    first = claims(workdir)[0]['refreshed']
    time.sleep(0.01)
    lease.refresh()
    assert claims(workdir)[0]['refreshed'] > first
    lease.check()
  finally:
    lease.release()


def test_stale_claims_are_replaced(workdir, capsys):
  d = epath.Path(workdir) / lease_lib.LEASE_DIR
  d.mkdir(parents=True, exist_ok=True)
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  now = time.time()
  old = lease_lib.Claim('elsewhere', 1, now - 4000, now - 4000, 'expired')
  gone = lease_lib.Claim(lease_lib.socket.gethostname(), int(dead.stdout), now, now, 'killed')
  for c in (old, gone):
    (d / f'{c.token}.json').write_text(json.dumps(lease_lib.dataclasses.asdict(c)))
  with lease_lib.RunLease(workdir, expiry_s=600):
    assert [c['pid'] for c in claims(workdir)] == [os.getpid()]
  out = capsys.readouterr().out
  assert out.count('replacing the stale run lease') == 2, out


def test_force_takes_over_and_the_holder_notices(workdir):
  holder = lease_lib.RunLease(workdir, expiry_s=600)
  holder.acquire()
  try:
    with lease_lib.RunLease(workdir, expiry_s=600, force=True) as taker:
      holder.refresh()
      with pytest.raises(lease_lib.LeaseLostError, match='taken over .* stops without saving'):
        holder.check()
      assert [c['token'] for c in claims(workdir)] == [taker.claim.token]
  finally:
    holder.release()
  assert claims(workdir) == []


def test_simultaneous_launch_backs_off(workdir, monkeypatch):
  """Another launch writes its claim between our listing and our write: our second listing sees
  it and we back off, removing our claim (that launch, listing after our write, does the same
  or wins alone; never both)."""
  now = time.time()
  other = lease_lib.Claim('other-host', 4242, now, now, 'other')
  original = lease_lib.RunLease._write
  def write_with_a_rival(self, claim):
    original(self, claim)
    original(self, other)
  monkeypatch.setattr(lease_lib.RunLease, '_write', write_with_a_rival)
  with pytest.raises(lease_lib.LeaseHeldError, match='claimed it at the same moment by host '
                     'other-host, pid 4242'):
    lease_lib.RunLease(workdir, expiry_s=600).acquire()
  assert [c['token'] for c in claims(workdir)] == ['other']


def test_bad_expiry_is_refused(tmp_path):
  with pytest.raises(ValueError, match='config.checkpoint.lease_expiry_s=0 must be > 0'):
    lease_lib.RunLease(str(tmp_path), expiry_s=0)


MULTIPROCESS = r'''
import json, sys, jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from ppflow_jax import lease
try:
  with lease.RunLease(sys.argv[3], expiry_s=600) as l:
    print('HELD', json.dumps(dict(process=jax.process_index(), claim=bool(l.claim))), flush=True)
    jax.experimental.multihost_utils.sync_global_devices('done')
except lease.LeaseHeldError as e:
  print('REFUSED', e, flush=True)
'''


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _job(script, workdir) -> list[str]:
  address = f'127.0.0.1:{_free_port()}'
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  procs = [subprocess.Popen([sys.executable, str(script), address, str(i), workdir], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [out for out, _ in outs]


def test_multiprocess_job_process_zero_holds_it(tmp_path):
  script = tmp_path / 'job.py'
  script.write_text(MULTIPROCESS)
  outs = _job(script, str(tmp_path / 'work'))
  held = [json.loads(o.split('HELD ')[1]) for o in outs]
  assert held == [dict(process=0, claim=True), dict(process=1, claim=False)], outs
  # Another job on the same workdir while a claim is live: every process is refused.
  with lease_lib.RunLease(str(tmp_path / 'work'), expiry_s=600):
    outs = _job(script, str(tmp_path / 'work'))
  assert 'REFUSED workdir' in outs[0] and f'pid {os.getpid()}' in outs[0], outs
  assert 'REFUSED process 0 was refused the run lease' in outs[1], outs
