"""Checkpoint acceptance: bitwise-exact resume after SIGKILL, SIGTERM saves and exits 0, restore on
other meshes, and the guards (non-finite loss, corrupt latest step, config/shape mismatch), a
second launch on a running workdir (refused by the run lease), a save that fails mid-run, and
config.json left alone by refused runs and sampling. docs/checkpoint.md's fault table lists
these tests.

Training runs are `python -m ppflow_jax.main` subprocesses of a tiny `configs/default.py:runlocal`
sharing a persistent compilation cache, so only the first run (and the lr=1e30 one) compiles.
Guard tests restore copies of the reference run's workdir in process (nothing to compile but a
checksum reduction).
"""

from __future__ import annotations

import glob
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tests.helpers import ROOT

from ppflow_jax import checkpoint
from ppflow_jax import config_lib
from ppflow_jax import data as data_lib
from ppflow_jax import sharding
from ppflow_jax.models import block_stack
from ppflow_jax.train import Trainer

STEPS, EVERY = 40, 5
SMALL = dict(depth=2, hidden_size=32, num_heads=2)
FLAGS = ['--config=configs/default.py:runlocal'] + [
    f'--config.model.{k}={v}' for k, v in SMALL.items()] + ['--config.train.batch_size=8',
    f'--config.train.steps={STEPS}', '--config.train.log_every=1',
    f'--config.checkpoint.every_steps={EVERY}',
    '--config.checkpoint.max_to_keep=3', '--config.train.final_report=False']


def small_config(**train):
  """The in-process twin of FLAGS (same model, so it restores the subprocess checkpoints)."""
  c = config_lib.load_config('configs/default.py:runlocal')
  c.model.update(SMALL)
  c.train.update(batch_size=8, log_every=1, final_report=False, steps=STEPS, **train)
  c.checkpoint.update(every_steps=EVERY, max_to_keep=3)
  return config_lib.resolve(c)


@pytest.fixture(scope='module')
def env(tmp_path_factory) -> dict:
  cache = tmp_path_factory.mktemp('jax_cache')
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def main_cmd(workdir, *extra) -> list[str]:
  return [sys.executable, '-m', 'ppflow_jax.main', f'--workdir={workdir}', *FLAGS, *extra]


def run_main(workdir, env, *extra, check=True) -> subprocess.CompletedProcess:
  p = subprocess.run(main_cmd(workdir, *extra), env=env, cwd=ROOT, capture_output=True, text=True,
                     timeout=600)
  if check and p.returncode:
    raise AssertionError(f'main failed ({p.returncode}):\n{p.stderr[-3000:]}')
  return p


def metrics(workdir) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    lines = f.readlines()
  for line in lines:
    try:
      out.append(json.loads(line))
    except ValueError:  # being written
      pass
  return out


def saved_steps(workdir) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def read_state(workdir, step: int, trainer: Trainer) -> dict:
  """One step's raw state dict, read with plain orbax (no guards in the way)."""
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                             item_handlers=dict(state=ocp.StandardCheckpointHandler())) as m:
    return jax.device_get(m.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(checkpoint.abstract_state(trainer))))['state'])


def assert_bitwise_equal(a, b, what: str) -> None:
  fa, fb = checkpoint.flat_paths(a), checkpoint.flat_paths(b)
  assert fa.keys() == fb.keys(), what
  bad = [p for p in fa if not np.array_equal(np.asarray(fa[p]), np.asarray(fb[p]))]
  assert not bad, f'{what}: {len(bad)} arrays differ, e.g. {bad[:3]}'


@pytest.fixture(scope='module')
def reference(tmp_path_factory, env) -> str:
  """An uninterrupted STEPS-step run."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  run_main(workdir, env)
  return workdir


@pytest.fixture(scope='module')
def trainer() -> Trainer:
  c = small_config()
  return Trainer(c, sharding.make_mesh(c))


@pytest.fixture
def copy(reference, tmp_path) -> str:
  """A private copy of the reference workdir to damage."""
  shutil.copytree(reference, tmp_path / 'work')
  return str(tmp_path / 'work')


# -- exact resume, preemption -------------------------------------------------------------------


def test_sigkill_and_rerun_is_bitwise_exact(reference, env, tmp_path, trainer):
  kill_at = random.randint(EVERY + 1, STEPS - 5)
  workdir = str(tmp_path / 'killed')
  proc = subprocess.Popen(main_cmd(workdir), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not (metrics(workdir) and metrics(workdir)[-1]['step'] >= kill_at
               and saved_steps(workdir)):
      assert proc.poll() is None and time.time() < deadline, 'run ended before the kill'
      time.sleep(0.01)
  finally:
    proc.kill()
    proc.wait()
  killed_at = metrics(workdir)[-1]['step']
  assert killed_at < STEPS, f'the run finished before SIGKILL (kill_at={kill_at})'

  rerun = run_main(workdir, env)
  assert 'resuming from step' in rerun.stdout, rerun.stdout
  start = int(rerun.stdout.split('resuming from step ')[1].split()[0])
  assert 0 < start <= killed_at and start % EVERY == 0, (start, killed_at)

  ref, got = read_state(reference, STEPS, trainer), read_state(workdir, STEPS, trainer)
  for part in ('params', 'ema', 'opt_state', 'step', 'rng'):
    assert_bitwise_equal(ref[part], got[part], f'{part} after SIGKILL at step {killed_at}')
  # One record per step (lost steps' records are dropped on resume), identical to the reference.
  ref_m, got_m = metrics(reference), metrics(workdir)
  assert [m['step'] for m in got_m] == list(range(1, STEPS + 1))
  for r, g in zip(ref_m, got_m):
    timing = ('steps_per_sec', 'images_per_sec', 'mfu_estimate')
    assert {k: v for k, v in r.items() if k not in timing} == \
        {k: v for k, v in g.items() if k not in timing}, f'step {r["step"]} (resumed at {start})'


def wait_for(condition, proc, what: str, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, f'the run ended before {what}'
    assert time.time() < deadline, f'timed out waiting for {what}'
    time.sleep(0.01)


def assert_equals_reference(reference, workdir, trainer, what: str) -> None:
  ref, got = read_state(reference, STEPS, trainer), read_state(workdir, STEPS, trainer)
  for part in ('params', 'ema', 'opt_state', 'step', 'rng'):
    assert_bitwise_equal(ref[part], got[part], f'{part} {what}')
  drop = lambda m: {k: v for k, v in m.items() if k not in ('steps_per_sec', 'images_per_sec', 'mfu_estimate')}
  assert [drop(m) for m in metrics(workdir)] == [drop(m) for m in metrics(reference)], what


def test_second_launch_is_refused_and_leaves_the_run_alone(reference, env, tmp_path, trainer):
  workdir = str(tmp_path / 'busy')
  first = subprocess.Popen(main_cmd(workdir), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    wait_for(lambda: metrics(workdir), first, 'the first step')
    first.send_signal(signal.SIGSTOP)  # Hold it mid-run, lease taken, while the second starts.
    record = open(os.path.join(workdir, 'config.json'), 'rb').read()
    before = {p: os.path.getmtime(p) for p in glob.glob(f'{workdir}/**', recursive=True)}
    second = run_main(workdir, env, '--config.train.lr=0.5', check=False)
    assert second.returncode == 2, second.stderr[-3000:]
    last = second.stderr.strip().split('\n')[-1]
    assert last.startswith(f'error: workdir {workdir} is in use: it is held by host '), last
    assert f', pid {first.pid}, started ' in last and '--force' in last, last
    after = {p: os.path.getmtime(p) for p in glob.glob(f'{workdir}/**', recursive=True)}
    assert after == before  # nothing written, created or removed
    assert open(os.path.join(workdir, 'config.json'), 'rb').read() == record
  finally:
    first.send_signal(signal.SIGCONT)
    first.wait(timeout=600)
  assert first.returncode == 0
  assert_equals_reference(reference, workdir, trainer, 'of the run a second launch tried to join')
  assert os.listdir(os.path.join(workdir, 'run_lease')) == []  # released at exit

  # A refused resume (another model) and sampling leave the run record alone too.
  p = run_main(workdir, env, '--config.model.hidden_size=64', check=False)
  assert p.returncode != 0 and 'was written for another model' in p.stderr, p.stderr[-2000:]
  run_main(workdir, env, '--mode=sample', '--config.sample.method=euler',
           '--config.sample.num_steps=3', '--config.sample.num_images=2')
  assert open(os.path.join(workdir, 'config.json'), 'rb').read() == record
  with open(os.path.join(workdir, 'samples.json')) as f:
    sampled = json.load(f)
  assert sampled['step'] == STEPS and sampled['config']['sample']['num_steps'] == 3
  assert json.loads(record)['sample']['num_steps'] != 3


def test_failed_save_stops_the_run_and_keeps_the_last_good_step(reference, env, tmp_path,
                                                                  trainer):
  """The checkpoint filesystem starts refusing writes (RLIMIT_FSIZE: the array files no longer
  fit, like a full disk) after the step-10 save: the step-20 save fails in the background and
  the run stops before the next interval with one line; step 10 stays the latest, intact."""
  workdir = str(tmp_path / 'full')
  every = 10
  # Pipes, not files: the size limit would apply to log files of the run too.
  proc = subprocess.Popen(main_cmd(workdir, f'--config.checkpoint.every_steps={every}'),
                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  out = {}
  reader = threading.Thread(target=lambda: out.update(zip(('stdout', 'stderr'),
                                                          proc.communicate())))
  reader.start()
  try:
    wait_for(lambda: os.path.isdir(os.path.join(workdir, 'checkpoints', str(every))), proc,
             'the first save')
    proc.send_signal(signal.SIGSTOP)
    assert metrics(workdir)[-1]['step'] < 2 * every, 'too late to inject before the next save'
    # Above metrics.jsonl's final size, below the saved array files (hundreds of KB).
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
  finally:
    proc.send_signal(signal.SIGCONT)
    reader.join(timeout=600)
  assert proc.returncode == 1, out['stderr'][-3000:]
  # orbax's background threads may still log their own traceback after the run's last line.
  errors = [l for l in out['stderr'].split('\n') if l.startswith('error: ')]
  assert len(errors) == 1, out['stderr'][-3000:]
  last = errors[0]
  assert last.startswith(f'error: checkpoint step {2 * every} could not be written: '), last
  assert 'File too large' in last and last.endswith(f'; the last good step is {every}'), last
  stopped = metrics(workdir)[-1]['step']
  print(f'save of step {2 * every} failed; the run stopped after step {stopped}')
  assert 2 * every < stopped < 3 * every, stopped  # no interval of lost compute
  assert saved_steps(workdir) == [every]
  state = checkpoint.restore_for_inference(workdir, small_config(), trainer.mesh)  # checksums verified
  assert int(state.step) == every

  # Room again: the rerun drops the partial step 20, resumes from 10 and ends where an
  # uninterrupted run ends.
  rerun = run_main(workdir, env, f'--config.checkpoint.every_steps={every}')
  assert f'checkpoint step {2 * every} in ' in rerun.stdout and 'still being written' in rerun.stdout
  assert f'resuming from step {every}' in rerun.stdout
  assert_equals_reference(reference, workdir, trainer, 'after a failed save and a rerun')


def test_a_tensorstore_error_is_shortened_to_its_os_reason():
  """tensorstore ends its status with the source locations and the array's full spec; the line
  shown to the user keeps the file and the OS's reason, whatever the length of the spec."""
  spec = '{"driver":"zarr","kvstore":{"driver":"file","path":"' + 'deep/' * 300 + '"}}'
  root = ValueError(
      'OUT_OF_RANGE: Error opening "zarr" driver: Error writing local file "/w/checkpoints/20/'
      'state/params.blocks.attn.qkv.kernel/.zarray": Failed to write: File too large '
      "[os_error_code='27'] [source locations='tensorstore/internal/os/file_util.cc:500\n"
      "tensorstore/kvstore/file/file_key_value_store.cc:300'] [tensorstore_spec='" + spec + "']")
  try:
    try:
      raise root
    except ValueError as e:
      raise RuntimeError('save failed in ' + 'pybind11 method ' * 100) from e
  except RuntimeError as e:
    short = checkpoint._short(e)
  assert short.startswith('ValueError: OUT_OF_RANGE: Error opening "zarr" driver'), short
  assert short.endswith("File too large [os_error_code='27']"), short
  assert '.zarray' in short and len(short) < 400, short


def test_sigterm_saves_current_step_and_exits_zero(env, tmp_path, trainer):
  workdir = str(tmp_path / 'preempted')
  log = tmp_path / 'log'
  with open(log, 'w') as f:
    proc = subprocess.Popen(main_cmd(workdir, '--config.train.steps=100000',
                                     '--config.checkpoint.every_steps=100000'),
                            env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  deadline = time.time() + 300
  while not (metrics(workdir) and metrics(workdir)[-1]['step'] >= 3):
    assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  out = log.read_text()
  assert proc.returncode == 0, out[-3000:]
  last = metrics(workdir)[-1]['step']
  assert saved_steps(workdir) == [last], (saved_steps(workdir), last)
  assert int(read_state(workdir, last, trainer)['step']) == last
  assert f'preemption signal: saving step {last}' in out


# -- guards -------------------------------------------------------------------------------------


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(reference, copy, env, trainer):
  before = saved_steps(copy)
  p = run_main(copy, env, '--config.train.lr=1e30', f'--config.train.steps={STEPS + 20}',
               check=False)
  assert p.returncode != 0
  assert 'NonFiniteLossError' in p.stderr and 'is not finite' in p.stderr, p.stderr[-3000:]
  assert 'nothing after the last checkpoint was saved' in p.stderr
  bad_step = int(p.stderr.split('NonFiniteLossError: step ')[1].split(':')[0])
  assert STEPS < bad_step <= STEPS + 20
  assert saved_steps(copy) == before  # nothing new, nothing deleted
  state = checkpoint.restore_for_inference(copy, small_config(), trainer.mesh)
  ref = read_state(reference, STEPS, trainer)
  assert int(state.step) == STEPS
  assert_bitwise_equal(ref['ema'], jax.device_get(state.ema), 'EMA of the last good checkpoint')
  assert np.isfinite(np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.params)])).all()


def _truncate(step_dir):
  for f in glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_0', 'd', '*')):
    with open(f, 'r+b') as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _delete_array_file(step_dir):
  os.remove(max(glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_0', 'd', '*')),
                key=os.path.getsize))


def _swap_arrays(step_dir):
  """Silent corruption: intact, readable arrays with other values (the previous step's), so only
  the checksum notices. (Overwriting bytes of a data file is caught by zstd or not, depending
  on where the bytes land.)"""
  previous = os.path.join(os.path.dirname(step_dir), str(STEPS - EVERY), 'state')
  shutil.rmtree(os.path.join(step_dir, 'state'))
  shutil.copytree(previous, os.path.join(step_dir, 'state'))


# A failed orbax read leaves un-awaited read coroutines behind; they are orbax's, not ours.
ORBAX_LEFTOVERS = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


@ORBAX_LEFTOVERS
@pytest.mark.parametrize('damage, reason', [
    (_truncate, 'reading its arrays failed'),
    (lambda d: os.remove(os.path.join(d, 'state', '_METADATA')), 'metadata'),
    (lambda d: shutil.rmtree(os.path.join(d, 'state', 'ocdbt.process_0')), 'reading its arrays'),
    # The array named, with tensorstore's reason (not orbax's wrapper and its pybind repr).
    (_delete_array_file, 'reading its arrays failed (ValueError: FAILED_PRECONDITION: Error '
     'reading "'),
    (_swap_arrays, 'differ from what was saved (checksum)'),
])
def test_corrupt_latest_checkpoint_falls_back(copy, trainer, capsys, damage, reason):
  damage(os.path.join(copy, 'checkpoints', str(STEPS)))
  with checkpoint.Checkpointer(copy, small_config(), trainer) as ckpt:
    state = ckpt.restore_or_init(None)
  out = capsys.readouterr().out
  assert f'checkpoint step {STEPS} in ' in out and 'is unusable' in out and reason in out, out
  assert 'pybind' not in out and 'TensorStore(' not in out, out
  previous = STEPS - EVERY
  assert f'resuming from step {previous}' in out
  assert int(state.step) == previous
  assert os.path.isdir(os.path.join(copy, 'checkpoints_corrupt', str(STEPS)))
  assert saved_steps(copy)[-1] == previous


def test_failed_synchronous_save_names_the_last_good_step(copy, trainer, monkeypatch):
  c = small_config()
  c.checkpoint.async_save = False
  ckpt = checkpoint.Checkpointer(copy, c, trainer)
  state = ckpt.restore_or_init(None)
  def full(*args, **kwargs):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(ckpt.manager, 'save', full)
  with pytest.raises(checkpoint.CheckpointWriteError) as e:
    ckpt.save(STEPS + 1, state, None, force=True)
  ckpt.close()
  assert str(e.value) == (f'checkpoint step {STEPS + 1} could not be written: OSError: [Errno 28] '
                          f'No space left on device; the last good step is {STEPS}')
  assert saved_steps(copy)[-1] == STEPS


def test_interrupted_write_is_reported_and_ignored(copy, trainer, capsys):
  tmp = os.path.join(copy, 'checkpoints', f'{STEPS + EVERY}.orbax-checkpoint-tmp-1234')
  shutil.copytree(os.path.join(copy, 'checkpoints', str(STEPS)), tmp)
  with checkpoint.Checkpointer(copy, small_config(), trainer) as ckpt:
    state = ckpt.restore_or_init(None)
  out = capsys.readouterr().out
  assert f'checkpoint step {STEPS + EVERY} in' in out and 'still being written' in out, out
  assert int(state.step) == STEPS and not os.path.exists(tmp)


@ORBAX_LEFTOVERS
def test_every_checkpoint_corrupt_is_an_error(copy, trainer):
  steps = saved_steps(copy)
  for step in steps:
    _truncate(os.path.join(copy, 'checkpoints', str(step)))
  corrupt, directory = os.path.join(copy, 'checkpoints_corrupt'), os.path.join(copy, 'checkpoints')
  with checkpoint.Checkpointer(copy, small_config(), trainer) as ckpt, pytest.raises(
      checkpoint.CorruptCheckpointError) as e:
    ckpt.restore_or_init(None)
  msg = str(e.value)
  assert '\n' not in msg and msg.startswith(f'no checkpoint in {directory} could be restored'), msg
  assert f'all were moved to {corrupt}/' in msg, msg
  assert f'mv {corrupt}/{STEPS} {directory}/{STEPS}' in msg and f'rm -r {corrupt}' in msg, msg
  # The next run does not quietly start over from step 0 ...
  with checkpoint.Checkpointer(copy, small_config(), trainer) as ckpt, pytest.raises(
      checkpoint.CorruptCheckpointError) as e:
    ckpt.restore_or_init(None)
  msg = str(e.value)
  assert msg.startswith(f'{directory} holds no checkpoint but an earlier run quarantined steps '
                        f'{", ".join(map(str, steps))}; '), msg
  assert f'mv {corrupt}/{STEPS} {directory}/{STEPS}' in msg and '\n' not in msg, msg
  # ... unless the user removes the quarantine, as the message says.
  shutil.rmtree(corrupt)
  with checkpoint.Checkpointer(copy, small_config(), trainer) as ckpt:
    assert int(ckpt.restore_or_init(None).step) == 0


def test_model_config_mismatch_is_refused_with_fields(reference, trainer):
  c = small_config()
  c.model.hidden_size = 64
  c.schedule.boundaries = (0.6,)
  other = Trainer(c, sharding.make_mesh(c))
  with pytest.raises(checkpoint.ConfigMismatchError) as e, \
      checkpoint.Checkpointer(reference, c, other) as ckpt:
    ckpt.restore_or_init(None)
  msg = str(e.value)
  assert 'config.model.hidden_size: checkpoint 32, config 64' in msg, msg
  assert 'config.schedule.boundaries: checkpoint [0.5], config [0.6]' in msg, msg
  assert 'allow_model_mismatch' in msg
  # Execution-only fields (attention kernel, compute dtype) are not model changes.
  c = small_config()
  c.model.attention = 'xla'
  c.model.dtype = 'bfloat16'
  with open(os.path.join(reference, 'checkpoints', str(STEPS), 'config', 'metadata')) as f:
    assert not checkpoint.config_differences(json.load(f), c)


def test_shape_and_tree_mismatch_names_entries(reference):
  c = small_config()
  c.model.hidden_size = 64
  c.checkpoint.allow_model_mismatch = True
  wide = Trainer(c, sharding.make_mesh(c))
  with pytest.raises(checkpoint.CheckpointMismatchError) as e, \
      checkpoint.Checkpointer(reference, c, wide) as ckpt:
    ckpt.restore_or_init(None)
  msg = str(e.value)
  assert 'params/blocks/0/attn/qkv/kernel: checkpoint shape (32, 96) vs expected (64, 192)' in msg
  assert 'in opt_state' in msg and 'in ema' in msg  # the EMA and Adam moments, summarised
  # An optimizer change (no clipping: one level less in opt_state) is a tree mismatch.
  c = small_config(grad_clip_norm=0.0)
  no_clip = Trainer(c, sharding.make_mesh(c))
  with pytest.raises(checkpoint.CheckpointMismatchError) as e, \
      checkpoint.Checkpointer(reference, c, no_clip) as ckpt:
    ckpt.restore_or_init(None)
  assert 'missing from the checkpoint' in str(e.value) and 'opt_state/' in str(e.value)
  # ... which inference does not care about.
  state = checkpoint.restore_for_inference(reference, c, no_clip.mesh)
  assert int(state.step) == STEPS and state.opt_state is None


# -- data iterator, params-only checkpoints, init_from -------------------------------------------


def test_data_position_restored_across_process_counts(copy, trainer, capsys):
  c = small_config()
  fresh = lambda: data_lib.make_train_iterator(c, global_batch_size=8)
  expected = fresh()
  for _ in range(STEPS):
    next(expected)
  step_dir = os.path.join(copy, 'checkpoints', str(STEPS), 'data')
  with open(os.path.join(step_dir, 'process_0-of-1.json')) as f:
    assert json.load(f) == expected.get_state()
  os.rename(os.path.join(step_dir, 'process_0-of-1.json'),
            os.path.join(step_dir, 'process_0-of-2.json'))
  it = fresh()
  with checkpoint.Checkpointer(copy, c, trainer) as ckpt:
    ckpt.restore_or_init(it)
  assert 'another process count' in capsys.readouterr().out
  np.testing.assert_array_equal(next(it)['x'], next(expected)['x'])


def test_save_params_load_params_and_init_from(reference, trainer, tmp_path, capsys):
  c = small_config()
  params = read_state(reference, STEPS, trainer)['ema']
  path = checkpoint.save_params(str(tmp_path / 'imported'), params, c)
  assert path.endswith('converted_params')
  loaded = checkpoint.load_params(str(tmp_path / 'imported'), c, trainer.mesh)
  assert_bitwise_equal(params, jax.device_get(loaded), 'load_params')
  leaf = loaded['blocks'][0]['attn']['qkv']['kernel']
  assert leaf.sharding == trainer.state_sharding.params['blocks'][0]['attn']['qkv']['kernel']

  c.train.init_from = str(tmp_path / 'imported')
  with checkpoint.Checkpointer(str(tmp_path / 'finetune'), c, trainer) as ckpt:
    state = ckpt.restore_or_init(None)
  assert int(state.step) == 0
  assert_bitwise_equal(params, jax.device_get(state.params), 'init_from params')
  assert_bitwise_equal(params, jax.device_get(state.ema), 'init_from EMA')
  assert 'starting at step 0 from the params of' in capsys.readouterr().out
  # The params dir also serves --mode=sample.
  state = checkpoint.restore_for_inference(str(tmp_path / 'imported'), c, trainer.mesh)
  assert_bitwise_equal(params, jax.device_get(state.ema), 'sampling from params')

  wrong = small_config()
  wrong.model.num_classes = 7
  with pytest.raises(checkpoint.ConfigMismatchError, match='num_classes: checkpoint 10, config 7'):
    checkpoint.load_params(str(tmp_path / 'imported'), wrong, trainer.mesh)
  with pytest.raises(FileExistsError):
    checkpoint.save_params(str(tmp_path / 'imported'), params, c)
  # Params without their model fields are never loaded unguarded.
  os.remove(tmp_path / 'imported' / checkpoint.PARAMS_CONFIG)
  with pytest.raises(FileNotFoundError, match='params_config.json is missing'):
    checkpoint.load_params(str(tmp_path / 'imported'), c, trainer.mesh)


def test_other_block_layout_is_converted_or_refused(reference, trainer, tmp_path):
  """Params-only checkpoints convert between unrolled and scanned blocks; a training checkpoint of
  the other layout is refused in one line that says which flag resumes it."""
  c = small_config()
  params = read_state(reference, STEPS, trainer)['ema']
  checkpoint.save_params(str(tmp_path / 'unrolled'), params, c)
  scanned_config = small_config()
  scanned_config.model.scan_blocks = True
  scanned = Trainer(scanned_config, sharding.make_mesh(scanned_config))
  loaded = checkpoint.load_params(str(tmp_path / 'unrolled'), scanned_config, scanned.mesh)
  assert_bitwise_equal(block_stack.stack_params(params), jax.device_get(loaded), 'stacked load')
  assert (loaded['blocks']['attn']['qkv']['kernel'].sharding
          == scanned.state_sharding.params['blocks']['attn']['qkv']['kernel'])
  checkpoint.save_params(str(tmp_path / 'scanned'), jax.device_get(loaded), scanned_config)
  back = checkpoint.load_params(str(tmp_path / 'scanned'), c, trainer.mesh)
  assert_bitwise_equal(params, jax.device_get(back), 'unstacked load')
  with pytest.raises(checkpoint.CheckpointMismatchError) as e, \
      checkpoint.Checkpointer(reference, scanned_config, scanned) as ckpt:
    ckpt.restore_or_init(None)
  assert str(e.value).count('\n') == 0, str(e.value)
  assert 'unrolled (model.scan_blocks=False) blocks' in str(e.value)
  assert '--config.model.scan_blocks=False' in str(e.value)


def test_init_from_and_inference_errors(trainer, tmp_path):
  c = small_config()
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpoint.load_init_params(str(tmp_path / 'nope.pt'), c, trainer.mesh)
  (tmp_path / 'weights.txt').write_text('x')
  with pytest.raises(ValueError, match='must be a directory written by'):
    checkpoint.load_init_params(str(tmp_path / 'weights.txt'), c, trainer.mesh)
  with pytest.raises(FileNotFoundError, match='train first'):
    checkpoint.restore_for_inference(str(tmp_path), c, trainer.mesh)


# -- other topologies ---------------------------------------------------------------------------

MESH_SCRIPT = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from tests.helpers import tiny_config
from ppflow_jax import checkpoint, sharding
from ppflow_jax.train import Trainer

def trainer_on(n, fsdp, tensor):
  c = tiny_config()
  c.mesh.update(data=1, fsdp=fsdp, tensor=tensor)
  return c, Trainer(c, sharding.make_mesh(c, jax.devices()[:n]))

workdir = sys.argv[1]
c, t4 = trainer_on(4, 4, 1)
# Distinct values at every position of every leaf (Adam moments start as zeros).
state = jax.jit(lambda s: jax.tree.map(
    lambda x: x + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape), s),
    out_shardings=t4.state_sharding)(t4.init_state())
ckpt = checkpoint.Checkpointer(workdir, c, t4)
ckpt.save(1, state, None, force=True)
ckpt.close()
saved = jax.device_get(checkpoint.state_dict(state))
out = {}
for name, n, fsdp, tensor in (('1', 1, 1, 1), ('2x4', 8, 2, 4)):
  c, t = trainer_on(n, fsdp, tensor)
  ckpt = checkpoint.Checkpointer(workdir, c, t)
  got = checkpoint.state_dict(ckpt.restore_or_init(None))
  ckpt.close()
  flat, want = checkpoint.flat_paths(got), checkpoint.flat_paths(checkpoint.state_dict(t.state_sharding))
  ref = checkpoint.flat_paths(saved)
  inference = checkpoint.restore_for_inference(workdir, c, t.mesh)
  out[name] = dict(
      equal=all(np.array_equal(np.asarray(jax.device_get(v)), ref[p]) for p, v in flat.items()),
      inference_equal=all(np.array_equal(np.asarray(jax.device_get(v)), ref['ema/' + p])
                          for p, v in checkpoint.flat_paths(inference.ema).items()),
      target_shardings=all(v.sharding == want[p] for p, v in flat.items()),
      devices=sorted({v.sharding.num_devices for v in flat.values()}),
      mesh=dict(flat['params/blocks/0/attn/qkv/kernel'].sharding.mesh.shape),
      qkv=str(flat['params/blocks/0/attn/qkv/kernel'].sharding.spec),
      saved_qkv=str(state.params['blocks'][0]['attn']['qkv']['kernel'].sharding.spec))
print('RESULT' + json.dumps(out))
'''


def test_restore_on_other_meshes(env, tmp_path):
  script = tmp_path / 'mesh.py'
  script.write_text(MESH_SCRIPT)
  p = subprocess.run([sys.executable, str(script), str(tmp_path / 'work')], cwd=ROOT,
                     env=dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=8'),
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.split('RESULT')[1])
  assert out['1']['equal'] and out['2x4']['equal'], out
  assert out['1']['inference_equal'] and out['2x4']['inference_equal'], out
  assert out['1']['target_shardings'] and out['2x4']['target_shardings'], out
  assert out['1']['devices'] == [1] and out['2x4']['devices'] == [8], out
  assert out['2x4']['mesh'] == {'data': 1, 'fsdp': 2, 'tensor': 4}, out
  # Saved sharded 4-way over fsdp; restored over fsdp=2 x tensor=4.
  assert out['1']['saved_qkv'] == "P('fsdp', 'tensor')", out
  assert out['2x4']['qkv'] == "P('fsdp', 'tensor')", out
