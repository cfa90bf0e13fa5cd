"""The run lease: one training process writes a workdir at a time.

A training run holds `WORKDIR/run_lease/<token>.json` = {host, pid, started, refreshed, token}
while it runs and refreshes it from a background thread every `expiry_s / 10` seconds. A second
launch on the same workdir finds that claim and is refused (`LeaseHeldError`, exit status 2)
before it touches checkpoints, metrics or config.json. A claim is stale, and silently replaced,
when it was not refreshed for `expiry_s` seconds or when it names a process of this host that no
longer exists (a run killed with SIGKILL); `force=True` replaces a live one (after the user has
confirmed the holder is gone). A holder whose claim was replaced notices at its next check and
stops without saving (`LeaseLostError`).

Everything goes through `etils.epath`, so the same code works on local disks and buckets
(gs://): claims are separate objects written whole (temporary name, then rename) and a launch
wins only if, after writing its own claim, it lists no other live claim. Two launches that write
at the same moment may both back off (both refused), never both win. Multi-process jobs: process
0 holds the lease and broadcasts the outcome, so every process stops together.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

LEASE_DIR = 'run_lease'


class LeaseHeldError(RuntimeError):
  """Another live process holds the workdir's run lease."""


class LeaseLostError(RuntimeError):
  """This run's lease was taken over (--force) or removed while it was running."""


def _when(t: float) -> str:
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')


@dataclasses.dataclass(frozen=True)
class Claim:
  host: str
  pid: int
  started: float     # seconds since the epoch (the holder's clock)
  refreshed: float
  token: str

  def describe(self) -> str:
    return (f'host {self.host}, pid {self.pid}, started {_when(self.started)}, '
            f'last refreshed {_when(self.refreshed)}')


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, owned by someone else.
    return True
  return True


class RunLease:
  """Context manager holding `workdir`'s run lease (on process 0 of a multi-process job).

  Args:
    workdir: local path or URI (gs://...) of the run.
    expiry_s: a claim not refreshed for this long is stale (config.checkpoint.lease_expiry_s).
    force: take the lease over even from a live holder.
  """

  def __init__(self, workdir: str, *, expiry_s: float, force: bool = False):
    if expiry_s <= 0:
      raise ValueError(f'config.checkpoint.lease_expiry_s={expiry_s} must be > 0 (seconds)')
    self.directory = epath.Path(workdir) / LEASE_DIR
    self.expiry_s = float(expiry_s)
    self.force = force
    self.host = socket.gethostname()
    self.lead = jax.process_index() == 0
    self.claim: Claim | None = None
    self._lost: str | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  # -- claims on storage --------------------------------------------------------------------

  def _path(self, token: str) -> epath.Path:
    return self.directory / f'{token}.json'

  def _write(self, claim: Claim) -> None:
    """Whole-file write: a reader never sees half a claim."""
    tmp = self.directory / f'.{claim.token}.{time.time_ns()}.tmp'
    tmp.write_text(json.dumps(dataclasses.asdict(claim)))
    tmp.replace(self._path(claim.token))

  def _claims(self) -> dict[str, Claim | None]:
    """{token: claim} of every claim file (None: unreadable)."""
    out = {}
    if not self.directory.exists():
      return out
    for path in self.directory.iterdir():
      if not path.name.endswith('.json'):
        continue
      try:
        out[path.name[:-5]] = Claim(**json.loads(path.read_text()))
      except FileNotFoundError:  # Released while we listed.
        continue
      except (ValueError, TypeError) as e:
        logging.warning('unreadable lease claim %s: %s', path, e)
        out[path.name[:-5]] = None
    return out

  def _stale(self, claim: Claim | None, now: float) -> bool:
    if claim is None:
      return False  # Unknown holder: only --force removes it.
    if now - claim.refreshed > self.expiry_s:
      return True
    return claim.host == self.host and claim.pid != os.getpid() and not _pid_alive(claim.pid)

  def _live_others(self) -> dict[str, Claim | None]:
    now = time.time()
    others = {t: c for t, c in self._claims().items() if not self.claim or t != self.claim.token}
    for token, claim in list(others.items()):
      if self._stale(claim, now):
        print(f'replacing the stale run lease of {claim.describe()} in {self.directory}',
              flush=True)
        self._path(token).unlink(missing_ok=True)
        del others[token]
    return others

  def _refusal(self, others: dict[str, Claim | None], racing: bool = False) -> LeaseHeldError:
    token, claim = sorted(others.items(), key=lambda kv: kv[1].started if kv[1] else 0)[0]
    holder = claim.describe() if claim else f'an unreadable claim {self._path(token)}'
    expires = (f'; it expires at {_when(claim.refreshed + self.expiry_s)} unless refreshed'
               if claim else '')
    what = 'another launch claimed it at the same moment' if racing else 'it is held'
    return LeaseHeldError(
        f'workdir {self.directory.parent} is in use: {what} by {holder}{expires}. If that '
        'process is gone (check the host), rerun with --force to take the run over.')

  # -- acquire / refresh / release ---------------------------------------------------------

  def acquire(self) -> None:
    """Takes the lease (process 0) and agrees on the outcome across processes."""
    error = None
    if self.lead:
      try:
        self._acquire()
      except LeaseHeldError as e:
        error = e
    if jax.process_count() > 1:
      refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
      if refused and not self.lead:
        error = LeaseHeldError(f'process 0 was refused the run lease of '
                               f'{self.directory.parent} (its log names the holder)')
    if error is not None:
      raise error
    if self.lead:
      self._thread = threading.Thread(target=self._refresh_loop, name='run-lease', daemon=True)
      self._thread.start()

  def _acquire(self) -> None:
    self.directory.mkdir(parents=True, exist_ok=True)
    others = self._live_others()
    if others and not self.force:
      raise self._refusal(others)
    for token, claim in others.items():
      print(f'--force: taking over the run lease of '
            f'{claim.describe() if claim else self._path(token)}', flush=True)
      self._path(token).unlink(missing_ok=True)
    now = time.time()
    self.claim = Claim(host=self.host, pid=os.getpid(), started=now, refreshed=now,
                       token=uuid.uuid4().hex)
    self._write(self.claim)
    others = self._live_others()
    if others and not self.force:  # A launch that wrote between our listing and our write.
      self._path(self.claim.token).unlink(missing_ok=True)
      self.claim = None
      raise self._refusal(others, racing=True)

  def refresh(self) -> None:
    """Rewrites this run's claim with the current time, or records that it was taken."""
    if not self._path(self.claim.token).exists():
      others = self._claims()
      holder = next((c.describe() for c in others.values() if c), 'nobody')
      self._lost = (f'the run lease of {self.directory.parent} was taken over (now held by '
                    f'{holder}); this run stops without saving')
      return
    self.claim = dataclasses.replace(self.claim, refreshed=time.time())
    self._write(self.claim)

  def _refresh_loop(self) -> None:
    while not self._stop.wait(self.expiry_s / 10):
      try:
        self.refresh()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('could not refresh the run lease in %s: %s', self.directory, e)
      if self._lost:
        return

  def check(self) -> None:
    """Raises LeaseLostError (on every process) if the lease was taken over."""
    lost = self._lost is not None
    if jax.process_count() > 1:
      lost = bool(multihost_utils.broadcast_one_to_all(np.int32(lost)))
    if lost:
      raise LeaseLostError(self._lost or 'process 0 lost the run lease; stopping without saving')

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self.claim is not None and not self._lost:
      self._path(self.claim.token).unlink(missing_ok=True)
    self.claim = None

  def __enter__(self) -> RunLease:
    self.acquire()
    return self

  def __exit__(self, *_) -> None:
    self.release()
