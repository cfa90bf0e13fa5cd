"""Orbax checkpoints of the train state and the data iterator (minimal; hardened in issue 4)."""

from __future__ import annotations

import os
import signal

import jax
import ml_collections
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves/restores `TrainState` + data-iterator state in `workdir/checkpoints`."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, trainer):
    self.config = config
    self.trainer = trainer
    self._sigterm = False
    signal.signal(signal.SIGTERM, self._on_sigterm)
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, 'checkpoints')),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.max_to_keep,
                                             save_interval_steps=config.checkpoint.every_steps))

  def _on_sigterm(self, *_):
    self._sigterm = True

  def restore_or_init(self, data_iter):
    latest = self.manager.latest_step()
    if latest is None:
      return self.trainer.init_state()
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(self.trainer.init_state), self.trainer.state_sharding)
    restored = self.manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    return restored['state']

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    return self._sigterm or self.manager.reached_preemption(step)

  def maybe_save(self, step: int, state, data_iter) -> None:
    self.save(step, state, data_iter)

  def save(self, step: int, state, data_iter, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                      force=force)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_for_inference(workdir: str, config, trainer):
  """The latest train state of `workdir` (its `ema` is what samplers use)."""
  ckpt = Checkpointer(workdir, config, trainer)
  if ckpt.manager.latest_step() is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints: train first or convert '
                            'weights with python -m ppflow_jax.convert')
  state = ckpt.restore_or_init(None)
  ckpt.close()
  return state
