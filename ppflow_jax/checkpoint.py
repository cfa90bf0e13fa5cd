"""Orbax checkpoints of training runs: exact resume, preemption, guards, params-only checkpoints.

`Checkpointer(workdir, config, trainer)` manages `workdir/checkpoints/<step>/`, one orbax
`CheckpointManager` step directory per save with four items:

  state/        the `TrainState` as {step, params, ema, opt_state, rng} (sharded arrays, OCDBT);
  data/         the grain iterator position, one JSON file per process (grain's orbax handler);
  config/       the resolved config as JSON (checked against the config of a resumed run);
  checksum/     a wrapping uint32 sum of the bits of every state leaf, checked after a restore
                (it does not depend on the mesh, so it also holds across topologies).

A resumed run continues bit for bit: the state, the data position and the per-step RNG
(`fold_in(rng, step)`) all come back. Restores go through abstract targets carrying the current
trainer's shardings, so a checkpoint written on one mesh loads on any other. Guards:
an unreadable, incomplete or corrupt latest checkpoint is reported, moved to
`workdir/checkpoints_corrupt/` and the previous one is used; a checkpoint whose tree or shapes
differ from the config's raises `CheckpointMismatchError` naming the entries; a checkpoint whose
saved model/latent/patch schedule differs raises `ConfigMismatchError` unless
`config.checkpoint.allow_model_mismatch`. Non-finite steps never reach a save (loop.py).

`restore_for_inference` loads (step, params, EMA) only, so optimizer changes do not matter;
`save_params` / `load_params` write and read params-only checkpoints (imports, `init_from`).
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import threading
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from ppflow_jax import models
from ppflow_jax import paths
from ppflow_jax import weights
from ppflow_jax.convert import torch_io
from ppflow_jax.convert.torch_io import CheckpointMismatchError  # one class for every importer
from ppflow_jax.models import block_stack
from ppflow_jax.models import lora
from ppflow_jax.sharding import replicated
from ppflow_jax.train import Trainer, TrainState

CHECKPOINTS = 'checkpoints'
CORRUPT = 'checkpoints_corrupt'
# The one params-only format (imports, init_from, sampling without a run): orbax params in
# PARAMS_DIR plus the resolved config in PARAMS_CONFIG, whose model fields every load checks.
PARAMS_DIR = 'converted_params'
PARAMS_CONFIG = 'params_config.json'
# Model fields that change how the model runs, not what its weights mean.
# (model.scan_blocks changes the tree; `check_layout` and the params loaders handle it.)
UNGUARDED_FIELDS = ('model.attention', 'model.dtype', 'model.scan_blocks', 'model.remat')


class ConfigMismatchError(ValueError):
  """The checkpoint was written for a different model, latent or patch schedule."""


class CorruptCheckpointError(RuntimeError):
  """No checkpoint in the directory could be read back intact."""


class CheckpointWriteError(RuntimeError):
  """A save failed (disk full, read-only, bucket error); the last complete step is kept."""


# -- small helpers ----------------------------------------------------------------------------


def _say(message: str, warn: bool = False) -> None:
  """Logs, and prints on the lead process (the console is where users look on resume)."""
  (logging.warning if warn else logging.info)('%s', message)
  if jax.process_index() == 0:
    print(message, flush=True)


# tensorstore's status payloads: where in its C++ sources, and the full spec of the array (JSON,
# often kilobytes). They follow the OS's reason ("File too large [os_error_code='27']").
_TENSORSTORE_PAYLOADS = re.compile(r"\s*\[(?:source locations|tensorstore_spec)='[^']*'\]")


def _short(e: BaseException) -> str:
  """The first line of an exception's root cause (orbax wraps tensorstore's message, which names
  the array and the file, in one that prints a pybind method and pages of specs), without
  tensorstore's payloads, so the OS's reason survives."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  text = _TENSORSTORE_PAYLOADS.sub('', str(e)).strip() or repr(e)
  text = text.split('\n')[0]
  if len(text) > 300:
    text = f'{text[:160]} ... {text[-140:]}'
  return f'{type(e).__name__}: {text}'


def _key(k) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flat_paths(tree) -> dict[str, Any]:
  """{'params/blocks/0/attn/qkv/kernel': leaf, ...}; integer keys, list indices and namedtuple
  fields all become path parts, so saved metadata and live trees compare directly."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key(k) for k in path): leaf for path, leaf in leaves}


def state_dict(state: TrainState) -> dict:
  """The TrainState as the plain dict stored in checkpoints."""
  return dict(step=state.step, params=state.params, ema=state.ema, opt_state=state.opt_state,
              rng=state.rng)


def abstract_state(trainer: Trainer) -> dict:
  """Sharded `ShapeDtypeStruct`s of `state_dict(trainer.init_state())`, without computing it."""
  shapes = state_dict(jax.eval_shape(trainer.init_state))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, state_dict(trainer.state_sharding))


@jax.jit
def _checksums(tree) -> Any:
  """Per-leaf wrapping uint32 sums of the raw bits: exact, and independent of the sharding."""
  def one(x):
    if x.dtype.itemsize not in (1, 2, 4):
      return jnp.zeros((), jnp.uint32)
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[
        x.dtype.itemsize])
    return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)
  return jax.tree.map(one, tree)


def checksums(tree) -> dict[str, int]:
  """{path: checksum} of a tree of arrays (one small device->host transfer)."""
  return {p: int(v) for p, v in flat_paths(jax.device_get(_checksums(tree))).items()}


def config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def _guarded(cfg: dict) -> dict[str, Any]:
  """The fields that define the weights: model.*, latent.*, schedule patch sizes/boundaries."""
  out = {f'{section}.{k}': v for section in ('model', 'latent')
         for k, v in cfg.get(section, {}).items()}
  out.update({f'schedule.{k}': cfg.get('schedule', {}).get(k)
              for k in ('patch_sizes', 'boundaries')})
  return {k: v for k, v in out.items() if k not in UNGUARDED_FIELDS}


def config_differences(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
  """'config.model.hidden_size: checkpoint 32, config 64' for every differing guarded field."""
  old, new = _guarded(saved), _guarded(config_json(config))
  return [f'config.{k}: checkpoint {old.get(k, "<absent>")}, config {new.get(k, "<absent>")}'
          for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_config(saved: dict | None, config: ml_collections.ConfigDict, where: str) -> None:
  """Raises ConfigMismatchError if the saved config defines another model (unless allowed)."""
  if saved is None:
    return
  diffs = config_differences(saved, config)
  if not diffs:
    return
  listing = '\n  '.join(diffs)
  if config.checkpoint.allow_model_mismatch:
    _say(f'{where} was written with other model fields (allowed by '
         f'config.checkpoint.allow_model_mismatch):\n  {listing}', warn=True)
    return
  raise ConfigMismatchError(
      f'{where} was written for another model; these fields differ:\n  {listing}\n'
      'Use the config the checkpoint was trained with (its copy is in the checkpoint\'s config/ '
      'item), a fresh --workdir, or --config.checkpoint.allow_model_mismatch=True to load it '
      'anyway (array shapes must still match).')


def tree_differences(saved_metadata, expected, subtrees: tuple[str, ...] | None = None
                     ) -> list[str]:
  """Entries missing from / unexpected in the checkpoint and shape mismatches, by path.

  subtrees: compare only these top-level entries of the checkpoint (a partial restore).
  """
  saved = {p: tuple(m.shape) for p, m in flat_paths(saved_metadata).items()
           if subtrees is None or p.split('/')[0] in subtrees}
  want = {p: tuple(s.shape) for p, s in flat_paths(expected).items()}
  # params first: EMA and Adam moments mirror them, so their entries repeat the same story.
  order = lambda p: (not p.startswith('params/'), p)
  out = [f'{p}: missing from the checkpoint (expected shape {want[p]})'
         for p in sorted(set(want) - set(saved), key=order)]
  out += [f'{p}: in the checkpoint (shape {saved[p]}) but not in the config\'s model/optimizer'
          for p in sorted(set(saved) - set(want), key=order)]
  out += [f'{p}: checkpoint shape {saved[p]} vs expected {want[p]}'
          for p in sorted(set(want) & set(saved), key=order) if saved[p] != want[p]]
  return out


def check_layout(saved_metadata, expected, where: str) -> None:
  """Refuses, in one line, a training checkpoint whose blocks use the other layout."""
  saved = block_stack.flat_paths_stacked(flat_paths(saved_metadata), 'params/')
  wanted = block_stack.flat_paths_stacked(flat_paths(expected), 'params/')
  if saved != wanted:
    raise CheckpointMismatchError(
        f'{where} holds {block_stack.layout_name(saved)} blocks but the config builds '
        f'{block_stack.layout_name(wanted)} ones: resume it with '
        f'--config.model.scan_blocks={saved} (params-only checkpoints and init_from convert).')


def check_tree(saved_metadata, expected, where: str,
               subtrees: tuple[str, ...] | None = None) -> None:
  """Raises CheckpointMismatchError listing `tree_differences` (at most 20 shown)."""
  check_layout(saved_metadata, expected, where)
  diffs = tree_differences(saved_metadata, expected, subtrees)
  if diffs:
    shown = '\n  '.join(diffs[:20])
    if len(diffs) > 20:
      groups = collections.Counter(d.split('/')[0] for d in diffs[20:])
      shown += f'\n  ... and {len(diffs) - 20} more (' + ', '.join(
          f'{n} in {g}' for g, n in sorted(groups.items())) + ')'
    raise CheckpointMismatchError(
        f'{where} does not match the arrays the config builds ({len(diffs)} entries):\n  {shown}\n'
        'Check the model fields and the optimizer settings (train.grad_clip_norm, '
        'train.warmup_steps change the optimizer state tree) against the run that wrote it, or '
        'use a fresh --workdir.')


# -- the training checkpointer ----------------------------------------------------------------


class _Corrupt(Exception):
  """One checkpoint step cannot be used; the message says what is wrong."""


class Checkpointer:
  """Saves/restores `TrainState` + data-iterator state in `workdir/checkpoints`.

  The loop calls `restore_or_init(data_iter)` once, then per step `check_saves`, `should_save`,
  `reached_preemption`, `maybe_save`, and `save(..., force=True)` at the end, then `close()`.
  A failed save raises `CheckpointWriteError` at the first of those calls after it failed
  (`check_saves` waits for a save in progress only before the step that ends the next
  interval), naming the last complete step, which stays the latest on disk. With a `lease`
  (lease.RunLease), every save first checks that this run still holds the workdir.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, trainer: Trainer,
               lease=None):
    self.workdir = paths.absolute(workdir, 'workdir')
    self.directory = paths.join(self.workdir, CHECKPOINTS)
    self.config = config
    self.trainer = trainer
    self.every = config.checkpoint.every_steps
    self.lease = lease
    self.last_good: int | None = None   # the latest step known complete on disk
    self._pending: int | None = None    # a save whose outcome is not known yet
    self._failed = False
    self._config_json = config_json(config)
    self._report_unfinished_writes()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.max_to_keep, create=True,
            enable_async_checkpointing=config.checkpoint.async_save,
            cleanup_tmp_directories=True),
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           data=grain.checkpoint.CheckpointHandler(),
                           config=ocp.JsonCheckpointHandler(),
                           checksum=ocp.JsonCheckpointHandler()))
    self._sigterm = False
    self._announced = False
    self._previous_handler = None
    # Multi-process runs use JAX's preemption service, which owns SIGTERM (and agrees on a step
    # across hosts); a Python handler here would replace it.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, *_) -> None:
    if self._sigterm:  # A second SIGTERM: stop now, without waiting for the save.
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
      os.kill(os.getpid(), signal.SIGTERM)
    self._sigterm = True

  def _report_unfinished_writes(self) -> None:
    """Orbax writes into `<step>.orbax-checkpoint-tmp*` and renames when complete; leftovers are
    saves that a kill interrupted (the manager deletes them)."""
    if not paths.isdir(self.directory):
      return
    for name in sorted(p.name for p in paths.as_path(self.directory).iterdir()):
      if '.orbax-checkpoint-tmp' in name:
        _say(f'checkpoint step {name.split(".")[0]} in {self.directory} was still being written '
             f'when the previous run stopped ({name}); it is incomplete and will be deleted.',
             warn=True)

  # -- restore ------------------------------------------------------------------------------

  def restore_or_init(self, data_iter) -> TrainState:
    """The latest intact checkpoint's state (and data position), or a fresh/`init_from` state.

    Args:
      data_iter: the grain iterator to reposition (None: leave the data stream alone).
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      self._refuse_if_all_quarantined()
      return self._initial_state()
    expected = abstract_state(self.trainer)
    problems = []
    for step in steps:
      try:
        state = self._restore_step(step, expected, data_iter)
      except _Corrupt as e:
        problems.append(f'step {step}: {e}')
        _say(f'checkpoint step {step} in {self.directory} is unusable: {e}. '
             f'Moving it to {paths.join(self.workdir, CORRUPT)} and trying the previous one.',
             warn=True)
        self._quarantine(step)
        continue
      _say(f'resuming from step {step} ({paths.join(self.directory, str(step))})')
      self.last_good = step
      return state
    raise CorruptCheckpointError(
        f'no checkpoint in {self.directory} could be restored ({"; ".join(problems)}); '
        + self._quarantine_advice(steps[0]))

  def _quarantine_advice(self, step) -> str:
    corrupt = paths.join(self.workdir, CORRUPT)
    return (f'all were moved to {corrupt}/. To retry one after fixing it: mv {corrupt}/{step} '
            f'{self.directory}/{step}; to start from scratch instead: rm -r {corrupt} and rerun.')

  def _refuse_if_all_quarantined(self) -> None:
    """A workdir whose every step was quarantined must not silently restart from step 0."""
    corrupt = paths.join(self.workdir, CORRUPT)
    names = [p.name for p in paths.as_path(corrupt).iterdir()] if paths.isdir(corrupt) else []
    steps = sorted(int(n.split('-')[0]) for n in names if n.split('-')[0].isdigit())
    if steps:
      raise CorruptCheckpointError(
          f'{self.directory} holds no checkpoint but an earlier run quarantined steps '
          f'{", ".join(map(str, steps))}; ' + self._quarantine_advice(steps[-1]))

  def _restore_step(self, step: int, expected: dict, data_iter) -> TrainState:
    where = f'checkpoint step {step} in {self.directory}'
    saved_config, saved_sums, metadata = _read_step_metadata(self.manager, step)
    check_config(saved_config, self.config, where)
    check_tree(metadata, expected, where)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(expected)))['state']
    except Exception as e:  # pylint: disable=broad-except
      raise _Corrupt(f'reading its arrays failed ({_short(e)})') from e
    _verify_checksums(restored, saved_sums, metadata)
    if data_iter is not None:
      self._restore_data(step, data_iter)
    return TrainState(**restored)

  def _restore_data(self, step: int, data_iter) -> None:
    """Repositions the grain iterator; a changed process count reuses process 0's position
    (valid for data/pipeline.py, whose position counts global batches)."""
    item = paths.join(self.directory, str(step), 'data')
    mine = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    saved = sorted(f.name for f in (paths.as_path(item).iterdir() if paths.isdir(item) else [])
                   if f.name.startswith('process_') and f.name.endswith('.json'))
    try:
      if mine in saved:
        self.manager.restore(step, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(data_iter)))
      elif saved:
        other = next((f for f in saved if f.startswith('process_0-')), saved[0])
        _say(f'checkpoint step {step} holds the data position of another process count '
             f'({other}); using it for this process.', warn=True)
        data_iter.set_state(json.loads(paths.read_text(paths.join(item, other))))
      else:
        _say(f'checkpoint step {step} has no data-iterator state; the data stream restarts from '
             'its beginning (the run is no longer an exact continuation).', warn=True)
    except Exception as e:  # pylint: disable=broad-except
      raise _Corrupt(f'its data-iterator state is unreadable ({_short(e)})') from e

  def _quarantine(self, step: int) -> None:
    """Moves an unusable step out of the manager's directory so new saves can reuse its number."""
    if jax.process_index() == 0:
      dest = paths.join(self.workdir, CORRUPT, str(step))
      if paths.exists(dest):
        dest += f'-{int(time.time())}'
      paths.makedirs(paths.join(self.workdir, CORRUPT))
      paths.as_path(paths.join(self.directory, str(step))).rename(dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'ppflow_quarantine_{step}')
    self.manager.reload()

  def _initial_state(self) -> TrainState:
    init_from = self.config.train.init_from
    if not init_from:
      return self.trainer.init_state()
    params = load_init_params(init_from, self.config, self.trainer.mesh)
    _say(f'no checkpoint in {self.directory}: starting at step 0 from the params of {init_from}')
    return self.trainer.state_from_params(params)

  # -- save ---------------------------------------------------------------------------------

  def should_save(self, step: int) -> bool:
    """True on every `config.checkpoint.every_steps`-th step not saved yet."""
    latest = self.manager.latest_step()
    return step % self.every == 0 and (latest is None or step > latest)

  def reached_preemption(self, step: int) -> bool:
    """SIGTERM seen (single process) or JAX's multi-host preemption sync point reached."""
    if self._sigterm or self.manager.reached_preemption(step):
      if not self._announced:
        _say(f'preemption signal: saving step {step}, then exiting', warn=True)
        self._announced = True
      return True
    return False

  def maybe_save(self, step: int, state: TrainState, data_iter) -> None:
    self.save(step, state, data_iter, force=False)

  def check_saves(self, step: int) -> None:
    """Before training `step`: raises CheckpointWriteError if the last save has failed. Waits
    for a save in flight only when `step` ends an interval (the save after it would wait anyway),
    so a failed save stops the run before another interval of work is done on top of it."""
    if self._pending is not None and (self.should_save(step)
                                      or not self.manager.is_saving_in_progress()):
      self._settle()

  def _settle(self) -> None:
    """Waits for the pending save and records its outcome (raises if it failed)."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._fail(step, e)
    self.last_good = step

  def _fail(self, step: int, e: BaseException):
    self._failed = True
    last = 'none (no step was completed)' if self.last_good is None else self.last_good
    raise CheckpointWriteError(f'checkpoint step {step} could not be written: {_short(e)}; '
                               f'the last good step is {last}') from e

  def save(self, step: int, state: TrainState, data_iter, force: bool = False) -> None:
    """Saves (asynchronously if config.checkpoint.async_save) on the interval, or always if
    `force`; a step that is already saved is skipped. The caller has checked finiteness."""
    if step in self.manager.all_steps() or not (force or self.should_save(step)):
      return
    if self.lease is not None:
      self.lease.check()
    if self._pending is not None:
      self._settle()
    tree = state_dict(state)
    items = dict(state=ocp.args.StandardSave(tree),
                 config=ocp.args.JsonSave(self._config_json),
                 checksum=ocp.args.JsonSave(checksums(tree)))
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._fail(step, e)
    self._pending = step
    logging.info('checkpoint step %d -> %s', step, self.directory)

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *_) -> None:
    self.close()

  def close(self) -> None:
    """Waits for the last async save (raising CheckpointWriteError if it failed) and restores
    the previous SIGTERM handler."""
    try:
      if self._pending is not None and not self._failed:
        self._settle()
    finally:
      if self._previous_handler is not None:
        signal.signal(signal.SIGTERM, self._previous_handler)
        self._previous_handler = None
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:  # Otherwise it re-raises the failure already reported.
          raise


def _read_step_metadata(manager: ocp.CheckpointManager, step: int):
  """(saved config or None, saved checksums or None, state tree metadata); raises _Corrupt."""
  try:
    metadata = manager.item_metadata(step)
  except Exception as e:  # pylint: disable=broad-except
    raise _Corrupt(f'its metadata is unreadable ({_short(e)})') from e
  if metadata.get('state') is None:
    raise _Corrupt('its state metadata (state/_METADATA) is missing')
  saved = {}
  for name in ('config', 'checksum'):
    if not paths.isdir(paths.join(str(manager.directory), str(step), name)):
      saved[name] = None  # Written without it (older version): nothing to check.
      continue
    try:
      saved[name] = manager.restore(step, args=ocp.args.Composite(
          **{name: ocp.args.JsonRestore()}))[name]
    except Exception as e:  # pylint: disable=broad-except
      raise _Corrupt(f'its {name} item is unreadable ({_short(e)})') from e
  return saved['config'], saved['checksum'], metadata['state']


def _verify_checksums(restored, saved: dict[str, int] | None, metadata) -> None:
  """Compares restored leaves with the checksums written at save time (same dtype only)."""
  if saved is None:
    return
  dtypes = {p: np.dtype(m.dtype) for p, m in flat_paths(metadata).items()}
  leaves = flat_paths(restored)
  bad = [p for p, v in checksums(restored).items()
         if p in saved and dtypes.get(p) == leaves[p].dtype and saved[p] != v]
  if bad:
    raise _Corrupt(f'{len(bad)} arrays differ from what was saved (checksum), e.g. '
                   f'{", ".join(bad[:3])}')


# -- inference and params-only checkpoints ------------------------------------------------------


def params_target(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict:
  """Sharded `ShapeDtypeStruct`s of the params of `config`'s model on `mesh` (restore target)."""
  return models.abstract_params(config, mesh)[1]


def restore_for_inference(workdir: str, config: ml_collections.ConfigDict,
                          mesh: jax.sharding.Mesh) -> TrainState:
  """Step, params and EMA (what samplers use) from `workdir`, on the param shardings over `mesh`.

  Reads the latest intact `workdir/checkpoints` step (optimizer state is neither read nor
  needed: `opt_state` and `rng` are None), else params written by `save_params` / the converter
  into `workdir` (then EMA = params, step 0).
  """
  workdir = paths.absolute(workdir, 'workdir')
  directory = paths.join(workdir, CHECKPOINTS)
  if paths.isdir(directory):
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0,
                                                        create=False),
        item_handlers=dict(state=ocp.PyTreeCheckpointHandler(),
                           data=grain.checkpoint.CheckpointHandler(),
                           config=ocp.JsonCheckpointHandler(),
                           checksum=ocp.JsonCheckpointHandler()))
    try:
      if manager.all_steps():
        return _restore_inference_state(manager, directory, config, mesh)
    finally:
      manager.close()
  if paths.isdir(paths.join(workdir, PARAMS_DIR)):
    params = load_params(workdir, config, mesh)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=params,
                      opt_state=None, rng=None)
  raise FileNotFoundError(
      f'no checkpoint in {directory} and no {PARAMS_DIR}/ in {workdir}: train first '
      '(--mode=train with this --workdir) or convert weights with python -m ppflow_jax.convert '
      f'--workdir={workdir}')


def _restore_inference_state(manager: ocp.CheckpointManager, directory: str,
                             config: ml_collections.ConfigDict,
                             mesh: jax.sharding.Mesh) -> TrainState:
  """The latest intact step's {step, params, ema}; unusable steps are reported and skipped."""
  params = params_target(config, mesh)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
  target = dict(step=step, params=params, ema=params)
  problems = []
  for step in sorted(manager.all_steps(), reverse=True):
    where = f'checkpoint step {step} in {directory}'
    try:
      saved_config, saved_sums, metadata = _read_step_metadata(manager, step)
      check_config(saved_config, config, where)
      check_tree(metadata, target, where, subtrees=tuple(target))
      try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))['state']
      except Exception as e:  # pylint: disable=broad-except
        raise _Corrupt(f'reading its arrays failed ({_short(e)})') from e
      _verify_checksums(restored, saved_sums, metadata)
    except _Corrupt as e:
      problems.append(f'step {step}: {e}')
      _say(f'{where} is unusable: {e}; trying the previous one.', warn=True)
      continue
    _say(f'loaded step {step} from {directory} for inference')
    return TrainState(opt_state=None, rng=None, **restored)
  raise CorruptCheckpointError(f'no checkpoint in {directory} could be restored:\n  ' +
                               '\n  '.join(problems))


def save_params(directory: str, params, config: ml_collections.ConfigDict) -> str:
  """Writes a params-only checkpoint `directory/converted_params` (+ its config); returns it.

  Args:
    directory: where to write (created); must not hold params already.
    params: pure dict of arrays (`nnx.to_pure_dict` layout) of the model of `config`.
    config: the resolved config of that model (checked again by `load_params`).
  """
  directory = paths.absolute(directory)
  path = paths.join(directory, PARAMS_DIR)
  if paths.exists(path):
    raise FileExistsError(f'{path} exists; remove it or pick another directory')
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, params)
  if jax.process_index() == 0:
    paths.write_text(paths.join(directory, PARAMS_CONFIG), json.dumps(config_json(config),
                                                                       indent=2))
  return path


def load_params(directory: str, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """Params written by `save_params` (or the converter CLI), on their shardings over `mesh`.

  Args:
    directory: the directory given to `save_params`, or its `converted_params/` itself.
  Raises:
    ConfigMismatchError / CheckpointMismatchError: written for another model.
    FileNotFoundError: no params, or params without their model fields (params_config.json).
  """
  directory = paths.absolute(directory).rstrip('/')
  if directory.endswith('/' + PARAMS_DIR):
    directory = directory[:-len(PARAMS_DIR) - 1]
  path = paths.join(directory, PARAMS_DIR)
  if not paths.isdir(path):
    raise FileNotFoundError(f'{directory} holds no {PARAMS_DIR}/: write it with '
                            'checkpoint.save_params or python -m ppflow_jax.convert')
  fields = paths.join(directory, PARAMS_CONFIG)
  if not paths.exists(fields):  # unguarded params could belong to any model
    raise FileNotFoundError(f'{fields} is missing: the params in {path} were written without '
                            'the model fields that say which model they belong to. Write them '
                            'again with checkpoint.save_params or python -m ppflow_jax.convert.')
  check_config(json.loads(paths.read_text(fields)), config, f'the params in {path}')
  target = params_target(config, mesh)
  with ocp.StandardCheckpointer() as ckpt:
    metadata = ckpt.metadata(path).item_metadata
    saved_stacked = block_stack.flat_paths_stacked(flat_paths(metadata))
    if saved_stacked == config.model.scan_blocks:
      check_tree(metadata, target, f'the params in {path}')
      return ckpt.restore(path, target)
    # The other block layout: restore replicated, then convert onto the param shardings.
    other = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated(mesh)),
        block_stack.abstract_to_layout(target, saved_stacked))
    check_tree(metadata, other, f'the params in {path}')
    _say(f'the params in {path} have {block_stack.layout_name(saved_stacked)} blocks; converting '
         f'to {block_stack.layout_name(config.model.scan_blocks)}')
    return jax.jit(lambda p: block_stack.to_layout(p, config.model.scan_blocks),
                   out_shardings=jax.tree.map(lambda a: a.sharding, target))(
                       ckpt.restore(path, other))


def _saved_lora_rank(init_from: str) -> int:
  """The adapter rank of the params `init_from` holds (0: base params, or a weight file)."""
  fields = paths.join(init_from, PARAMS_CONFIG)
  if not (paths.isdir(init_from) and paths.exists(fields)):
    return 0
  return int(json.loads(paths.read_text(fields)).get('model', {}).get('lora_rank', 0))


def load_init_params(init_from: str, config: ml_collections.ConfigDict,
                     mesh: jax.sharding.Mesh):
  """What `config.train.init_from` names: a `save_params`/converter directory, or a PyTorch /
  safetensors SiT, DiT or PPF file (converted by ppflow_jax.convert). A config with LoRA
  adapters over base params gets fresh adapters (models/lora.py: the model starts as the base)."""
  if config.model.lora_rank and not _saved_lora_rank(init_from):
    base = load_init_params(init_from, lora.base_config(config), mesh)
    target = params_target(config, mesh)
    params = lora.add_adapters(base, target, jax.random.key(config.seed))
    return jax.device_put(params, jax.tree.map(lambda a: a.sharding, target))
  if paths.isdir(init_from):
    return load_params(init_from, config, mesh)
  if not paths.exists(init_from) and weights.release(init_from):  # a released name: download
    init_from = weights.resolve(init_from)
  if not paths.exists(init_from):
    raise FileNotFoundError(f'config.train.init_from={init_from!r} does not exist; give a weight '
                            'file (.pt/.safetensors) or a directory written by '
                            'python -m ppflow_jax.convert')
  if not init_from.endswith(torch_io.WEIGHT_SUFFIXES):
    raise ValueError(f'config.train.init_from={init_from!r} must be a directory written by '
                     f'checkpoint.save_params / python -m ppflow_jax.convert, or a weight file '
                     f'ending in one of {torch_io.WEIGHT_SUFFIXES}')
  from ppflow_jax.convert import params_for_init  # pylint: disable=g-import-not-at-top
  shardings = jax.tree.map(lambda a: a.sharding, params_target(config, mesh))
  return jax.device_put(params_for_init(init_from, config), shardings)
