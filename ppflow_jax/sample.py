"""One sampling command and the notebook API, from a released name, a weight file or a workdir.

  python -m ppflow_jax.sample --ckpt=PPF-XL-2.pt \\
      --class_labels=207,360,387,974,88,979,417,279 --seed=0 --out=sample.png

does what SiT's `sample.py` does: downloads the weights by name if needed (weights.py), converts
them once and caches the converted params (`$PPFLOW_CACHE/converted/`; later runs skip the
PyTorch import), samples with the config's published sampler (PPF-XL-2/3: Heun on 250 grid points
with the paper's stage CFG; SiT-XL/2: SiT's SDE sampler with CFG 1.5), decodes with the SD VAE
(`--vae=mse|ema|PATH|hf:<repo>`) and writes one grid PNG, printing the sampling time. `--config`
(a packaged name or file, with `--config.x=y` overrides) replaces the config a released name
implies; a plain weight file needs it.

In Python (what launch/colab_sampling.ipynb uses):

  pipe = Pipeline.from_pretrained('PPF-XL-2')                   # or a path, a URL, a workdir
  images = pipe(class_labels=[207, 360], seed=0)                # uint8 (N, 256, 256, 3)

A Pipeline samples through its `inference.Inference` (`pipe.model`), the one sampling path of
`main --mode=sample`, `sample_fid`, the report and the benchmarks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ppflow_jax import config_lib
from ppflow_jax import errors
from ppflow_jax import inference
from ppflow_jax import paths
from ppflow_jax import report
from ppflow_jax import sharding
from ppflow_jax import weights

# SiT's sample.py: --vae {ema, mse}, the SD VAEs fine-tuned by Stability AI.
VAES = {'mse': 'hf:stabilityai/sd-vae-ft-mse', 'ema': 'hf:stabilityai/sd-vae-ft-ema'}
DEFAULT_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)  # SiT/DiT's demo classes


def parse_labels(text: str, num_classes: int | None = None) -> list[int]:
  """'207,360' -> [207, 360]; raises UserError for anything else or ids outside the classes."""
  try:
    labels = [int(x) for x in text.replace(' ', '').split(',') if x]
  except ValueError:
    raise errors.UserError(f'--class_labels={text!r}: expected comma-separated class ids, e.g. '
                           '207,360,387') from None
  if not labels:
    raise errors.UserError('--class_labels is empty: give at least one class id')
  if num_classes is not None:
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
      raise errors.UserError(f'--class_labels {bad} are outside [0, {num_classes}) '
                             f'(config.model.num_classes={num_classes})')
  return labels


def config_for(spec: str, config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """The config to sample `spec` with: the given one, or the one its released name implies."""
  if config is not None:
    return config_lib.resolve(config)
  entry = weights.release(os.path.basename(spec))
  if entry is None:
    raise errors.UserError(f'--ckpt={spec}: not a released name, so give its config too, e.g. '
                           '--config=ppf_xl_2 (packaged names: ' +
                           ', '.join(config_lib.config_names()) + ')')
  if entry.config is None:
    raise errors.UserError(f'{entry.name} is {entry.note}; it cannot be sampled by this flow '
                           'sampler. Use it with --config.train.init_from to fine-tune from it')
  return config_lib.resolve(config_lib.load_config(entry.config))


def _cache_key(file: str, config: ml_collections.ConfigDict) -> str:
  st = os.stat(file)
  model = config.model.to_json_best_effort(sort_keys=True) + str(config.schedule.patch_sizes)
  text = f'{os.path.realpath(file)}|{st.st_size}|{st.st_mtime_ns}|{model}'
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_params(spec: str, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                progress: bool = True, say=print) -> dict:
  """Params of `config`'s model from a released name, URL, weight file or converted workdir;
  a PyTorch/safetensors file is converted once and cached under $PPFLOW_CACHE/converted/."""
  from ppflow_jax import checkpoint, convert  # pylint: disable=g-import-not-at-top
  if paths.isdir(spec):  # the one params-only format, guarded by its model fields
    return checkpoint.load_params(spec, config, mesh)
  file = weights.resolve(spec, progress=progress)
  stem = os.path.splitext(os.path.basename(file))[0]
  cached = os.path.join(weights.cache_dir(), 'converted', f'{stem}-{_cache_key(file, config)}')
  if os.path.isdir(os.path.join(cached, checkpoint.PARAMS_DIR)):
    say(f'converted weights: {cached} (cached)')
    return checkpoint.load_params(cached, config, mesh)
  t0 = time.perf_counter()
  params = convert.load_torch_checkpoint(file, config)
  os.makedirs(os.path.dirname(cached), exist_ok=True)
  checkpoint.save_params(cached, params, config)
  say(f'converted {file} in {time.perf_counter() - t0:.1f} s -> {cached}')
  return params


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """Class labels in, images out: an `inference.Inference` (model, sampler, optional VAE) with
  label checks and uint8 output."""
  model: inference.Inference

  @classmethod
  def from_pretrained(cls, ckpt: str, *, config: ml_collections.ConfigDict | str | None = None,
                      vae: str | None = 'mse', progress: bool = True, say=print) -> Pipeline:
    """ckpt: a released name (`PPF-XL-2`), a URL, a .pt/.safetensors file or a converted
    workdir; config: a ConfigDict or a config name/file (default: the release's); vae: 'mse',
    'ema', a diffusers directory, `hf:<repo>`, or None for no decoding."""
    if isinstance(config, str):
      config = config_lib.load_config(config)
    config = config_for(ckpt, config)
    decoder = None
    if vae:
      from ppflow_jax.convert import vae as vae_lib  # pylint: disable=g-import-not-at-top
      decoder = vae_lib.load_diffusers_vae(weights.resolve(VAES.get(vae, vae), progress=progress))
    mesh = sharding.make_mesh(config)
    params = load_params(ckpt, config, mesh, progress=progress, say=say)
    return cls(inference.Inference.from_params(config, params, mesh=mesh, vae=decoder))

  @classmethod
  def from_params(cls, config: ml_collections.ConfigDict, params: dict,
                  vae: nnx.Module | None = None) -> Pipeline:
    """A pipeline around params already in memory (pure dict of `config`'s model)."""
    return cls(inference.Inference.from_params(config, params, vae=vae))

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.model.config

  @property
  def params(self) -> dict:
    return self.model.params

  @property
  def vae(self) -> nnx.Module | None:
    return self.model.vae

  def with_vae(self, vae: nnx.Module | None) -> Pipeline:
    """The same model decoding with another VAE (e.g. one VAE shared by two pipelines)."""
    return Pipeline(dataclasses.replace(self.model, vae=vae))

  def latents(self, class_labels: Sequence[int], seed: int = 0, **spec_overrides) -> np.ndarray:
    """Latents (N, h, w, C) for the labels; sample i depends only on (seed, i)."""
    labels = np.asarray(class_labels, np.int32)
    parse_labels(','.join(map(str, labels.tolist())), self.config.model.num_classes)
    return self.model.generate(labels, seed, **spec_overrides)

  def decode(self, latents: np.ndarray) -> np.ndarray:
    """Latents -> uint8 images (N, H, W, C): the VAE decoder, or the latents as images."""
    return report.to_uint8(self.model.decode(jnp.asarray(latents)))

  def __call__(self, class_labels: Sequence[int], seed: int = 0, **spec_overrides) -> np.ndarray:
    """uint8 images (N, H, W, C) for `class_labels` (spec overrides: num_steps=, method=, ...)."""
    return self.decode(self.latents(class_labels, seed, **spec_overrides))


def run(ckpt: str, class_labels: Sequence[int], *, seed: int, out: str,
        config: ml_collections.ConfigDict | None, vae: str | None, nrow: int) -> float:
  """The command: builds the pipeline, samples (timed), writes the grid; returns the seconds."""
  pipe = Pipeline.from_pretrained(ckpt, config=config, vae=vae)
  spec = pipe.model.sampler().spec
  print(f'sampling {len(class_labels)} images: {spec.method}, {spec.num_steps} grid points, '
        f'CFG {list(pipe.config.schedule.cfg_scales)} per stage, on {jax.devices()[0].device_kind}')
  t0 = time.perf_counter()
  latents = pipe.latents(class_labels, seed)
  seconds = time.perf_counter() - t0
  images = pipe.decode(latents)
  report.save_png(report.make_grid(images, nrow=nrow or min(len(images), 4)), out)
  print(f'sampled in {seconds:.2f} s (compilation included); wrote {out}')
  return seconds


def define_flags():
  """The command's flags (defined only when it runs as a command)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('ckpt', None, 'Released name (PPF-XL-2.pt, PPF-XL-3.pt, '
                      'SiT-XL-2-256x256.pt), URL, .pt/.safetensors file or converted workdir.')
  flags.DEFINE_string('class_labels', ','.join(map(str, DEFAULT_LABELS)),
                      'Comma-separated class ids, one image each.')
  flags.DEFINE_integer('seed', 0, 'Noise seed (image i depends only on seed and i).')
  flags.DEFINE_string('out', 'sample.png', 'Output PNG (a path or a URL such as gs://...).')
  flags.DEFINE_string('vae', 'mse', "'mse' | 'ema' (SD VAEs) | a diffusers dir | hf:<repo> | "
                      "'none' (write latents as images).")
  flags.DEFINE_integer('nrow', 0, 'Images per grid row (default min(N, 4), as SiT).')
  config_flags.DEFINE_config_file('config', None, 'Config (default: the one of a released '
                                  '--ckpt); overrides with --config.x=y.', lock_config=True)
  flags.mark_flags_as_required(['ckpt'])


def main(argv) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  config = config_lib.resolve(f.config) if f.config is not None else None
  vae = None if f.vae == 'none' else f.vae
  run(f.ckpt, parse_labels(f.class_labels), seed=f.seed, out=f.out, config=config, vae=vae,
      nrow=f.nrow)


def console() -> None:
  from ppflow_jax import cli  # pylint: disable=g-import-not-at-top
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  console()
