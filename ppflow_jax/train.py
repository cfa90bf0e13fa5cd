"""The training state and the functional, sharded train step.

`Trainer` owns the model graph (static), the optimizer and the shardings. Its jitted step takes
the whole `TrainState` (params, EMA, optimizer state, step, base RNG key) with explicit in/out
shardings and donation, merges the model inside, and returns the new state: nothing is updated
in place. The per-step randomness is `fold_in(rng, step)`, so a resumed run repeats exactly.

A step whose loss or gradient is not finite leaves the state unchanged and reports it in
`metrics['nonfinite']`; the loop stops on it (loop.py), so a bad state is never saved.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from ppflow_jax import flow
from ppflow_jax import packing
from ppflow_jax import sharding
from ppflow_jax import stages as stages_lib
from ppflow_jax.models import build_model
from ppflow_jax.models import lora


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # () int32
  params: Any            # pure dict of arrays (nnx.to_pure_dict layout)
  ema: Any               # same tree as params
  opt_state: Any         # optax state
  rng: jax.Array         # (2,) uint32 base key data


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
  """step -> learning rate: config.train.lr after a linear warm-up of warmup_steps."""
  t = config.train
  return optax.linear_schedule(0.0, t.lr, t.warmup_steps) if t.warmup_steps else (lambda _: t.lr)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW (paper: lr 1e-4, no weight decay) with optional warmup and global-norm clipping.

  With LoRA adapters (config.model.lora_rank > 0) only the adapters are optimised; the base
  gets no update and no optimizer state.
  """
  t = config.train
  lr = learning_rate(config) if t.warmup_steps else t.lr
  adamw = optax.adamw(lr, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay)
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), adamw) if t.grad_clip_norm else adamw
  if not config.model.lora_rank:
    return tx
  labels = lambda params: jax.tree.map(lambda a: 'adapter' if a else 'frozen',
                                       lora.trainable_mask(params))
  return optax.multi_transform({'adapter': tx, 'frozen': optax.set_to_zero()}, labels)


def bucket(tree, sizes: tuple[int, ...]) -> list:
  """Splits the leading axis of every leaf into consecutive stage buckets of `sizes`."""
  out, start = [], 0
  for n in sizes:
    out.append(jax.tree.map(lambda a, s=start, n=n: a[s:s + n], tree))
    start += n
  return out


class Trainer:
  """Builds, shards and steps a PPF model for `config` on `mesh`."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.config = config
    self.mesh = mesh
    self.schedule = stages_lib.from_config(config)
    self.batch_shards = sharding.batch_shards(mesh)
    if config.train.batch_size % self.batch_shards:
      raise ValueError(f'config.train.batch_size={config.train.batch_size} is not divisible by '
                       f'the {self.batch_shards} batch shards of the mesh {dict(mesh.shape)} '
                       "(data x fsdp); change the batch size or config.mesh")
    self.bucket_sizes = self.schedule.bucket_sizes(config.train.batch_size)
    self.tx = make_optimizer(config)
    abstract = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
    self.graphdef, abstract_state = nnx.split(abstract)
    self.rules = sharding.rules_from_config(config)
    params_sharding = nnx.to_pure_dict(sharding.param_shardings(mesh, abstract_state, self.rules))
    abstract_params = nnx.to_pure_dict(abstract_state)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    repl = sharding.replicated(mesh)
    if config.model.lora_rank:  # only the (replicated) adapters have optimizer state
      opt_sharding = jax.tree.map(lambda _: repl, abstract_opt)
    else:
      opt_sharding = sharding.opt_state_shardings(self.tx, abstract_opt, params_sharding, mesh)
    self.state_sharding = TrainState(step=repl, params=params_sharding, ema=params_sharding,
                                     opt_state=opt_sharding, rng=repl)
    self.batch_sharding = {'x': sharding.batch_sharding(mesh, 4),
                           'y': sharding.batch_sharding(mesh, 1)}
    self._init = jax.jit(self._init_state, static_argnums=0, out_shardings=self.state_sharding)
    self.step = jax.jit(self._train_step,
                        in_shardings=(self.state_sharding, self.batch_sharding),
                        out_shardings=(self.state_sharding, repl), donate_argnums=0)

  # -- state --------------------------------------------------------------------------------

  def _init_state(self, seed: int) -> TrainState:
    model = build_model(self.config, nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema=jax.tree.map(jnp.copy, params), opt_state=self.tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))

  def init_state(self, seed: int | None = None) -> TrainState:
    return self._init(self.config.seed if seed is None else seed)

  def state_from_params(self, params) -> TrainState:
    """A fresh state (step 0, EMA = params, new optimizer) around given params (imports)."""
    params = jax.device_put(params, self.state_sharding.params)
    return jax.jit(lambda p: TrainState(
        step=jnp.zeros((), jnp.int32), params=p, ema=jax.tree.map(jnp.copy, p),
        opt_state=self.tx.init(p), rng=jax.random.key_data(jax.random.key(self.config.seed))),
                   out_shardings=self.state_sharding)(params)

  # -- loss and step ------------------------------------------------------------------------

  def loss_fn(self, params, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
    """batch: {'x': (B, H, W, C) data latents x1, 'y': (B,) labels} -> (loss, per-stage losses)."""
    cfg = self.config
    model = nnx.merge(self.graphdef, params)
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    x1 = batch['x'].astype(jnp.float32)
    x0 = jax.random.normal(k_noise, x1.shape, jnp.float32)
    y = flow.drop_labels(k_drop, batch['y'], cfg.model.class_dropout, cfg.model.num_classes)
    ts = flow.sample_times(k_t, self.schedule, self.bucket_sizes, cfg.train.regime,
                           cfg.train.lumina_shift)
    x0s, x1s, ys = (list(z) for z in zip(*bucket((x0, x1, y), self.bucket_sizes)))
    xts = [flow.interpolate(a, b, t) for a, b, t in zip(x0s, x1s, ts)]
    # Whole packed rows per batch shard (PackPlan.row_multiple): the kernels run per shard.
    preds = packing.bucketed_forward(model, xts, ts, ys, cfg.train.packing,
                                     row_multiple=self.batch_shards)
    per_stage = [flow.per_sample_mse(p, flow.velocity_target(a, b))
                 for p, a, b in zip(preds, x0s, x1s)]
    loss = jnp.concatenate(per_stage).mean()
    return loss, {f'loss_stage{i}': l.mean() for i, l in enumerate(per_stage)}

  def _train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    with sharding.axis_rules(self.rules):  # activation constraints follow config.mesh.rules
      (loss, aux), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(state.params, batch, key)
    if self.config.model.lora_rank:  # a frozen base: no gradient, and its arrays pass through
      mask = lora.trainable_mask(grads)
      grads = jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, mask)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = self.config.train.ema_decay
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
    if self.config.model.lora_rank:  # bitwise: p + 0 and the EMA of a constant can round
      params, ema = (jax.tree.map(lambda n, o, m: n if m else o, new, old, mask)
                     for new, old in ((params, state.params), (ema, state.ema)))
    new = TrainState(step=state.step + 1, params=params, ema=ema, opt_state=opt_state,
                     rng=state.rng)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    return new, dict(loss=loss, grad_norm=grad_norm, nonfinite=1 - finite.astype(jnp.int32), **aux)
