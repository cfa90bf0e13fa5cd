"""Sampling without training state: `Inference`, a model's graph, weights, schedule and shardings.

An `Inference` holds what sampling needs and nothing else (no optimizer, no train step). It is
what `main --mode=sample` and `--mode=sample_fid`, the end-of-run report, the benchmarks, the
experiments and the Colab notebook sample with. Build one with

  Inference.from_params(config, params)      weights in memory (an import, a fresh init);
  Inference.from_workdir(workdir, config)    a run's latest intact checkpoint (EMA weights unless
                                             config.sample.use_ema is False), or the converted
                                             params in the workdir;
  Inference.from_trainer(trainer, params)    a Trainer's graph and shardings (after training).

then `sampler(**overrides)` gives the per-stage sampler programs of config.sample (with
`sampling.SamplerSpec` overrides, e.g. `force_finest=True`; one Sampler per spec, kept, so a
second call does not compile again), `generate(labels, seed)` samples latents (N, H, W, C) in
chunks of config.sample.batch_size (sample i depends only on (seed, i)), and `decode(latents)`
maps them to images with the VAE, if there is one. `sample.Pipeline` (the sampling command and
the notebook API) wraps one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from ppflow_jax import adaptive
from ppflow_jax import checkpoint
from ppflow_jax import config_lib
from ppflow_jax import models
from ppflow_jax import sampling
from ppflow_jax import sharding
from ppflow_jax import stages as stages_lib


@dataclasses.dataclass(frozen=True)
class Inference:
  """A model ready to sample: built by the `from_*` constructors, never mutated."""
  config: ml_collections.ConfigDict   # resolved
  graphdef: nnx.GraphDef
  params: Any                         # pure dict (nnx.to_pure_dict layout) on the param shardings
  schedule: stages_lib.Schedule
  mesh: jax.sharding.Mesh
  step: int = 0                       # training step of the weights (0: imported or fresh)
  vae: Any = None                     # models.vae.AutoencoderKL, or None: latents are images
  # Samplers built so far, by spec (not copied by dataclasses.replace: a new config, new ones).
  _samplers: dict = dataclasses.field(default_factory=dict, init=False, repr=False,
                                      compare=False)

  # -- constructors ---------------------------------------------------------------------------

  @classmethod
  def from_params(cls, config: ml_collections.ConfigDict, params, *,
                  mesh: jax.sharding.Mesh | None = None, step: int = 0, vae=None) -> Inference:
    """`params` (pure dict of the model of `config`) placed on their shardings over `mesh`
    (default: config.mesh over all devices)."""
    config = config_lib.resolve(config)
    mesh = mesh or sharding.make_mesh(config)
    graphdef, target = models.abstract_params(config, mesh)
    params = jax.device_put(params, jax.tree.map(lambda a: a.sharding, target))
    return cls(config, graphdef, params, stages_lib.from_config(config), mesh, int(step), vae)

  @classmethod
  def from_workdir(cls, workdir: str, config: ml_collections.ConfigDict, *,
                   mesh: jax.sharding.Mesh | None = None, vae=None) -> Inference:
    """The weights `checkpoint.restore_for_inference` finds in `workdir` (checked against
    `config`'s model fields and shapes): the EMA, or the raw params if not config.sample.use_ema."""
    config = config_lib.resolve(config)
    mesh = mesh or sharding.make_mesh(config)
    graphdef, _ = models.abstract_params(config)
    state = checkpoint.restore_for_inference(workdir, config, mesh)
    params = state.ema if config.sample.use_ema else state.params
    return cls(config, graphdef, params, stages_lib.from_config(config), mesh,
               int(jax.device_get(state.step)), vae)

  @classmethod
  def from_trainer(cls, trainer, params, *, step: int = 0, vae=None) -> Inference:
    """Shares a `train.Trainer`'s graph, schedule and mesh; `params` are already on its
    shardings (e.g. `state.ema`)."""
    return cls(trainer.config, trainer.graphdef, params, trainer.schedule, trainer.mesh,
               int(jax.device_get(step)), vae)

  # -- sampling -------------------------------------------------------------------------------

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one latent."""
    lat = self.config.latent
    return (lat.height, lat.width, lat.channels)

  @property
  def batch_sharding(self) -> dict[str, jax.sharding.NamedSharding]:
    """Shardings of a batch: 'x' (B, H, W, C) noise/latents, 'y' (B,) labels or keys."""
    return {'x': sharding.batch_sharding(self.mesh, 4), 'y': sharding.batch_sharding(self.mesh, 1)}

  @property
  def batch_shards(self) -> int:
    """How many ways a batch is split over the mesh (data x fsdp)."""
    return sharding.batch_shards(self.mesh)

  def sampler(self, **spec_overrides) -> sampling.Sampler:
    """The sampler of config.sample with SamplerSpec field overrides (built once per spec)."""
    spec = sampling.SamplerSpec.from_config(self.config, **spec_overrides)
    if spec not in self._samplers:
      self._samplers[spec] = adaptive.make_sampler(self.graphdef, self.schedule, spec,
                                                   self.config.model.num_classes)
    return self._samplers[spec]

  def generate(self, labels: np.ndarray, seed: int, **spec_overrides) -> np.ndarray:
    """labels: (N,) int -> latents (N, H, W, C), sample i from `sampling.index_noise(.., i, seed)`."""
    return sampling.sample_in_chunks(self.sampler(**spec_overrides), self.params,
                                     self.latent_shape, np.asarray(labels, np.int32), seed,
                                     self.config.sample.batch_size)[0]

  def decode(self, latents: jax.Array) -> jax.Array:
    """Model latents (N, H, W, C) -> images in [-1, 1] (the identity without a VAE)."""
    if self.vae is None:
      return latents
    return self.vae.decode(latents / self.config.vae.scaling_factor)
