"""The configuration schema: the one base `ConfigDict` every config file starts from, model size
presets, and validation of user overrides.

Every choice that changes published numbers (time direction, CFG channels, sampler and steps,
precision, stage boundaries) is a field here, with the published behaviour documented next to it.
Config files in `configs/` call `base_config()` and fill in what differs; command-line overrides
(`--config.train.steps=100`) go through ml_collections, which rejects unknown fields, and
`validate()` rejects values that are well-typed but meaningless.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from ppflow_jax import errors

# The config files: configs/ of the checkout, installed as the package data ppflow_jax/configs.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')

# (depth, hidden_size, num_heads) of the SiT/DiT family (SiT paper, Table 1).
MODEL_SIZES = {
    'S': (12, 384, 6),
    'B': (12, 768, 12),
    'L': (24, 1024, 16),
    'XL': (28, 1152, 16),
}

# Stage schedules of the paper (§4.1); patches are (rows, cols). The paper's three-level "4x2"
# patch is 2 rows x 4 columns (token grid 16 x 8 on a 32 x 32 latent), as in the official code.
SCHEDULES = {
    1: dict(boundaries=(), patch_sizes=((2, 2),)),
    2: dict(boundaries=(0.5,), patch_sizes=((4, 4), (2, 2))),
    3: dict(boundaries=(0.5, 0.75), patch_sizes=((4, 4), (2, 4), (2, 2))),
    # PPF-B-4 / B-5: the paper lists neither patches nor boundaries; its Testing FLOPs (Table 7:
    # 46.5, 38.3) fit equal time quarters / fifths with these patches (see flops.py and README).
    4: dict(boundaries=(0.25, 0.5, 0.75), patch_sizes=((4, 8), (4, 4), (2, 4), (2, 2))),
    5: dict(boundaries=(0.2, 0.4, 0.6, 0.8), patch_sizes=((8, 8), (4, 8), (4, 4), (2, 4), (2, 2))),
}

# The models the experiments compare (benchmarks, mini reproduction): name -> (label, number of
# stages of SCHEDULES). SiT is the one-stage case of the same model.
PAPER_MODELS = {'sit': ('SiT', 1), 'ppf2': ('PPF-2', 2), 'ppf3': ('PPF-3', 3)}


def model_label(name: str, patches: bool = False, patch_scale: int = 1) -> str:
  """'PPF-2', or with its patches (rows x cols, coarsest first; each side times `patch_scale`)
  'PPF-2 (4x4 | 2x2)'."""
  label, stages = PAPER_MODELS[name]
  if not patches:
    return label
  sizes = scaled_patches(stages, patch_scale)
  return f"{label} ({' | '.join(f'{r}x{c}' for r, c in sizes)})"


def scaled_patches(num_stages: int, patch_scale: int = 1) -> tuple[tuple[int, int], ...]:
  """The paper's `num_stages` patch sizes with both sides times `patch_scale` (a 2x2 finest
  patch becomes 4x4 at scale 2: a quarter of the tokens, the same stage ratios)."""
  return tuple((r * patch_scale, c * patch_scale) for r, c in SCHEDULES[num_stages]['patch_sizes'])


def base_config() -> ml_collections.ConfigDict:
  """The full schema with SiT-XL/2-on-ImageNet-256 defaults; config files override fields."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      variant='ppf',          # 'ppf' (SiT is the 1-stage case) | 'mpdit' (see models/mpdit.py).
      size='XL',              # key of MODEL_SIZES; depth/hidden/heads below follow it if 0.
      depth=0, hidden_size=0, num_heads=0,
      mlp_ratio=4.0,
      num_classes=1000,
      class_dropout=0.1,      # label dropout in training; null class id = num_classes.
      learn_sigma=True,       # 2*C output channels, second half ignored (SiT-XL-2-256 checkpoint).
      level_embedding=True,   # learned per-stage row added to the conditioning vector (paper §4.4).
      dtype='float32',        # compute dtype: 'float32' | 'bfloat16' (params stay param_dtype).
      param_dtype='float32',
      attention='auto',       # 'auto' | 'xla' | 'splash' | 'pallas_gpu' | 'cudnn' (ops/attention.py).
      # models/block_stack.py: stacked block params under one lax.scan (compiles the block once),
      # and rematerialisation 'none' | 'full' | 'dots' (keep only weight-matmul outputs).
      scan_blocks=False, remat='none',
      # MPDiT only (models/mpdit.py): blocks that run on small-patch tokens, class prefix tokens.
      mpdit_fine_blocks=6, mpdit_class_tokens=16, mpdit_coarse_patch=(),  # () = 2x the finest.
      # Per-patch-size LoRA (FlexiDiT §3.2, models/lora.py): rank 0 = none; with rank > 0
      # training updates only the adapters of these shared-block linears (the base is frozen).
      lora_rank=0, lora_targets=('qkv', 'proj', 'fc1', 'fc2'),
  ))

  # The latent the model sees, (H, W, C) NHWC: SD-VAE latents of 256px ImageNet by default.
  c.latent = ml_collections.ConfigDict(dict(height=32, width=32, channels=4))

  # Stage schedule (stages.py): interior boundaries in (0, 1), increasing; one patch (rows, cols)
  # and one CFG scale per stage, coarsest (t = 0, noise) first, finest last.
  c.schedule = ml_collections.ConfigDict(dict(
      boundaries=(0.5,), patch_sizes=((4, 4), (2, 2)), cfg_scales=(1.0, 3.0)))

  c.train = ml_collections.ConfigDict(dict(
      steps=400_000,
      batch_size=256,         # global batch; split over stages in proportion to time ranges.
      lr=1e-4, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,  # paper: AdamW 1e-4, no decay.
      warmup_steps=0,
      grad_clip_norm=0.0,     # 0 = off (SiT/PPFlow do not clip).
      ema_decay=0.9999,
      regime='ppflow',        # 'ppflow' | 'flexidit' | 'lumina' (flow.py: timestep sampler).
      lumina_shift=3.0,       # 'lumina' regime: time-shift strength for the smallest/largest patch.
      packing=True,           # Patch n' Pack of coarse samples into finest-length rows.
      log_every=100,
      sample_every=0,         # 0 = no periodic sample grids.
      init_from='',           # '' | a converted workdir | a PyTorch/safetensors SiT/PPF file.
      final_report=False,     # after training: sample grid, loss plot, PPF-vs-finest timing report.
  ))

  c.sample = ml_collections.ConfigDict(dict(
      method='heun',          # 'euler' | 'heun' (ODE, fixed grid) | 'sde' (Euler-Maruyama, SiT)
                              # | 'dopri5' (adaptive ODE, one program per stage; adaptive.py).
      atol=1e-6, rtol=1e-3,   # 'dopri5' error tolerances (SiT's torchdiffeq defaults).
      num_steps=250,          # grid points: linspace(0, 1, num_steps) -> num_steps - 1 steps
                              # (official PPFlow: heun over linspace(0, 1, 250)).
      cfg_channels='all',     # 'all' | 'legacy' = guide latent channels 0..2 only (SiT/DiT/PPFlow).
      skip_unit_cfg=True,     # a stage with scale 1.0 runs the conditional pass only (exact math).
      sde_last_step=0.04,     # SiT SDE: EM on linspace(0, 1 - last, n), then one mean step.
      sde_diffusion_norm=1.0,  # SiT 'sigma' diffusion form: norm * (1 - t).
      batch_size=64,
      num_images=16,          # --mode=sample grid size.
      force_finest=False,     # use the finest stage at every t (the SiT reference of a PPF model).
      guidance='cfg',         # 'cfg' | 'weak_conditional' (FlexiDiT §3.4: the weak patch's
      guidance_stage=0,       #   conditional prediction replaces the unconditional one).
      use_ema=True,
  ))

  c.data = ml_collections.ConfigDict(dict(
      source='imagenet',      # 'fashion_mnist' | 'imagenet' | 'image_folder' | 'latents'.
      path='',                # tfds data_dir / image folder / latent shard directory.
      image_size=256,
      flip=True,              # random horizontal flip, the only augmentation (ADM/SiT).
      shuffle_seed=0,
      num_workers=0,          # grain worker processes (0 = in process).
      prefetch=2,
  ))

  c.vae = ml_collections.ConfigDict(dict(
      path='',                # diffusers AutoencoderKL weights dir/file; '' = no VAE (latents are images).
      scaling_factor=0.18215,  # SD VAE (Rombach et al.); latent = VAE(x) * scaling_factor.
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=5000, max_to_keep=3, async_save=True,
      allow_model_mismatch=False,  # refuse a checkpoint whose model fields differ from the config.
      lease_expiry_s=600.0,   # a run lease not refreshed for this long is stale (lease.py).
  ))

  # Device mesh (-1: all remaining devices) and the logical-axis -> mesh-axis rules of params and
  # activations (sharding.py; MaxText-style): e.g. ('mlp', None) keeps MLP weights unsharded.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=(
      ('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'),
      ('vocab', None), ('layers', None))))

  c.eval = ml_collections.ConfigDict(dict(
      num_samples=50_000, labels='uniform',  # 'uniform' (ADM/DiT) | 'balanced' (50 per class).
      reference_batch='', inception_weights='', out_dir='',
      # ADM-suite choices (evaluation/evaluate.py); the defaults are the ADM-closest ones.
      inception_preprocess='tf1',  # 'tf1' (ADM's TF graph ops, emulated) | 'pytorch_fid'.
      pr_distances='float16',  # precision/recall distances: ADM float16 (float32 on overflow).
      is_split_size=5000,     # IS over contiguous chunks of this many samples (ADM).
      fmnist_fid=True,        # Fashion-MNIST runs: FID of the report's samples (feature network).
      report_samples=200,     # samples per row of the end-of-run report (FID and timing).
  ))
  return c


def model_config(size: str, **overrides) -> ml_collections.ConfigDict:
  """`base_config().model` with depth/hidden/heads filled from a MODEL_SIZES preset."""
  m = base_config().model
  m.size = size
  m.depth, m.hidden_size, m.num_heads = MODEL_SIZES[size]
  m.update(overrides)
  return m


def set_schedule(config: ml_collections.ConfigDict, num_stages: int, cfg_scales,
                 patch_scale: int = 1) -> None:
  """Fills `config.schedule` with the paper's `num_stages` schedule (patches times
  `patch_scale`, see scaled_patches) and the given CFG scales."""
  config.schedule.boundaries = SCHEDULES[num_stages]['boundaries']
  config.schedule.patch_sizes = scaled_patches(num_stages, patch_scale)
  config.schedule.cfg_scales = tuple(cfg_scales)


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fills derived model fields (size preset) in place and validates; returns the config."""
  m = config.model
  if m.size not in MODEL_SIZES:
    raise errors.ConfigError(f'config.model.size={m.size!r} is not one of {sorted(MODEL_SIZES)}')
  depth, hidden, heads = MODEL_SIZES[m.size]
  m.depth = m.depth or depth
  m.hidden_size = m.hidden_size or hidden
  m.num_heads = m.num_heads or heads
  validate(config)
  return config


def config_names() -> list[str]:
  """Names of the packaged configs (`ppf_xl_2`, ...)."""
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith('.py') and f[0] != '_')


def find_config(spec: str) -> str:
  """`path.py[:arg]` or a packaged config's name (`ppf_xl_2`, `configs/ppf_xl_2.py`) -> the
  config file's path, `:arg` kept. Raises ConfigError naming the known configs."""
  path, sep, arg = spec.partition(':')
  if os.path.isfile(path):
    return spec
  name = os.path.basename(path)
  name = name[:-3] if name.endswith('.py') else name
  packaged = os.path.join(CONFIG_DIR, name + '.py')
  if os.path.dirname(path) in ('', 'configs') and os.path.isfile(packaged):
    return packaged + sep + arg
  raise errors.ConfigError(
      f'--config={spec}: config file {path!r} not found (relative to {os.getcwd()}); pass an '
      f'existing .py file or a packaged config name: {", ".join(config_names())}')


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The ConfigDict of `spec` (see find_config): the file's `get_config(arg)`."""
  path, _, arg = find_config(spec).partition(':')
  module_spec = importlib.util.spec_from_file_location(
      os.path.basename(path)[:-3].replace('-', '_'), path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None) if arg else module.get_config()


def _choice(value, name: str, allowed) -> None:
  if value not in allowed:
    raise errors.ConfigError(f'{name}={value!r} must be one of {list(allowed)}')


def _at_least(config: ml_collections.ConfigDict, dotted: str, low: int, why: str) -> None:
  value = config
  for part in dotted.split('.'):
    value = value[part]
  if not isinstance(value, (int, float)) or value < low:
    raise errors.ConfigError(f'config.{dotted}={value!r} must be >= {low} ({why})')


# Fields a run divides by, loops over or allocates with: (field, lowest value, why).
_LOWER_BOUNDS = (
    ('model.depth', 1, 'number of transformer blocks'),
    ('model.hidden_size', 1, 'model width'),
    ('model.num_heads', 1, 'attention heads'),
    ('model.num_classes', 1, 'class-conditional models need at least one class'),
    ('latent.height', 1, 'latent size'),
    ('latent.width', 1, 'latent size'),
    ('latent.channels', 1, 'latent size'),
    ('train.steps', 1, 'training steps'),
    ('train.batch_size', 1, 'global batch'),
    ('train.log_every', 1, 'metrics are fetched every log_every steps; use a large value to log '
     'rarely'),
    ('train.sample_every', 0, '0 turns periodic sample grids off'),
    ('train.warmup_steps', 0, 'linear warm-up length'),
    ('sample.batch_size', 1, 'samples per sampler call'),
    ('sample.num_images', 1, 'images in the --mode=sample grid'),
    ('checkpoint.every_steps', 1, 'checkpoints are saved every every_steps steps; use a value '
     'above train.steps to save only at the end'),
    ('checkpoint.max_to_keep', 1, 'checkpoints kept'),
    ('data.image_size', 1, 'image side in pixels'),
    ('data.num_workers', 0, 'grain worker processes; 0 reads in the main process'),
    ('data.prefetch', 0, 'batches read ahead'),
    ('eval.num_samples', 1, 'samples of --mode=sample_fid'),
    ('eval.report_samples', 1, 'samples of the end-of-run report'),
)


def _validate_lora(m: ml_collections.ConfigDict) -> None:
  if not isinstance(m.lora_rank, int) or m.lora_rank < 0:
    raise errors.ConfigError(f'config.model.lora_rank={m.lora_rank!r} must be an int >= 0 '
                             '(0 = no adapters)')
  if not m.lora_rank:
    return
  if m.variant != 'ppf':
    raise errors.ConfigError(f'config.model.lora_rank={m.lora_rank}: per-patch LoRA is '
                             f'implemented for the ppf variant only, not {m.variant!r}')
  known = ('qkv', 'proj', 'fc1', 'fc2')
  if not m.lora_targets or any(t not in known for t in m.lora_targets):
    raise errors.ConfigError(f'config.model.lora_targets={tuple(m.lora_targets)} must be a '
                             f'non-empty subset of {known}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (a ValueError) with the offending field for values no run can use."""
  m = config.model
  _choice(m.variant, 'config.model.variant', ('ppf', 'mpdit'))
  _choice(m.dtype, 'config.model.dtype', ('float32', 'bfloat16'))
  _choice(m.param_dtype, 'config.model.param_dtype', ('float32', 'bfloat16'))
  _choice(m.attention, 'config.model.attention', ('auto', 'xla', 'splash', 'pallas_gpu', 'cudnn'))
  _choice(m.remat, 'config.model.remat', ('none', 'full', 'dots'))
  if m.variant != 'ppf' and (m.scan_blocks or m.remat != 'none'):
    raise ValueError(f'config.model.scan_blocks / remat are implemented for the ppf variant only; '
                     f'set them to False / "none" for variant={m.variant!r}')
  for dotted, low, why in _LOWER_BOUNDS:
    _at_least(config, dotted, low, why)
  _validate_lora(m)
  if m.hidden_size % m.num_heads:
    raise errors.ConfigError(f'config.model.hidden_size={m.hidden_size} is not divisible by '
                             f'num_heads={m.num_heads}')
  if not 0.0 <= m.class_dropout < 1.0:
    raise errors.ConfigError(f'config.model.class_dropout={m.class_dropout} must be in [0, 1)')
  _choice(config.train.regime, 'config.train.regime', ('ppflow', 'flexidit', 'lumina'))
  _choice(config.sample.method, 'config.sample.method', ('euler', 'heun', 'sde', 'dopri5'))
  if not (config.sample.atol > 0 and config.sample.rtol >= 0):
    raise errors.ConfigError(f'config.sample.atol={config.sample.atol} must be > 0 and '
                             f'config.sample.rtol={config.sample.rtol} >= 0 (dopri5 tolerances; '
                             'SiT: 1e-6, 1e-3)')
  if config.sample.method == 'dopri5' and config.train.final_report:
    raise errors.ConfigError("config.sample.method='dopri5' with config.train.final_report=True: "
                             'the run report compares fixed-grid evaluation counts; report with '
                             "method='heun' and sample dopri5 with --mode=sample/sample_fid")
  _choice(config.sample.cfg_channels, 'config.sample.cfg_channels', ('all', 'legacy'))
  _choice(config.data.source, 'config.data.source',
          ('fashion_mnist', 'imagenet', 'image_folder', 'latents'))
  _choice(config.eval.labels, 'config.eval.labels', ('uniform', 'balanced'))
  _choice(config.eval.inception_preprocess, 'config.eval.inception_preprocess',
          ('tf1', 'pytorch_fid'))
  _choice(config.eval.pr_distances, 'config.eval.pr_distances', ('float16', 'float32', 'float64'))
  if config.eval.is_split_size < 1:
    raise ValueError(f'config.eval.is_split_size={config.eval.is_split_size} must be >= 1 '
                     '(ADM: 5000)')
  if config.sample.num_steps < 2:
    raise errors.ConfigError(f'config.sample.num_steps={config.sample.num_steps} must be >= 2 '
                             '(it counts grid points including both ends)')
  if not 0.0 <= config.sample.sde_last_step < 1.0:
    raise errors.ConfigError(f'config.sample.sde_last_step={config.sample.sde_last_step} must be '
                             'in [0, 1)')
  if not 0.0 <= config.train.ema_decay < 1.0:
    raise errors.ConfigError(f'config.train.ema_decay={config.train.ema_decay} must be in [0, 1)')
  if config.train.grad_clip_norm < 0:
    raise errors.ConfigError(f'config.train.grad_clip_norm={config.train.grad_clip_norm} must be '
                             '>= 0 (0 turns clipping off)')
  for axis, size in ((a, config.mesh[a]) for a in ('data', 'fsdp', 'tensor')):
    if size != -1 and size < 1:
      raise errors.ConfigError(f'config.mesh.{axis}={size} must be -1 (all remaining devices) or '
                               '>= 1')
  # Stage schedule checks live with the schedule itself.
  from ppflow_jax import stages  # pylint: disable=g-import-not-at-top
  try:
    stages.from_config(config)
  except errors.ConfigError:
    raise
  except ValueError as e:
    raise errors.ConfigError(str(e) if str(e).startswith('config.') else
                             f'config.schedule: {e}') from e


def imagenet_config(size: str, num_stages: int, cfg_scales, *, resolution: int = 256,
                    arg: str | None = None) -> ml_collections.ConfigDict:
  """SiT/PPF on ImageNet SD-VAE latents (32x32x4 at 256 px, 64x64x4 at 512 px).

  `arg='runlocal'` shrinks the model, batch and steps for a quick local run of the same recipe
  on Fashion-MNIST data (big_vision's `config.py:runlocal` convention).
  """
  c = base_config()
  c.model.update(model_config(size))
  c.latent.height = c.latent.width = resolution // 8
  c.data.image_size = resolution
  c.data.source = 'latents'
  set_schedule(c, num_stages, cfg_scales)
  # The published FIDs (SiT, DiT, PPFlow) guide latent channels 0..2 only; 'all' is one override.
  c.sample.cfg_channels = 'legacy'
  if arg == 'runlocal':
    c.model.update(model_config('S', depth=2, hidden_size=96, num_heads=4, num_classes=10))
    c.latent.update(height=32, width=32, channels=1)
    c.data.source = 'fashion_mnist'
    c.vae.path = ''
    c.train.update(steps=20, batch_size=16, log_every=5)
    c.sample.update(num_steps=8, batch_size=8, num_images=8)
    c.checkpoint.every_steps = 10
  elif arg:
    raise errors.ConfigError(f'unknown config argument {arg!r}; the only one is "runlocal"')
  return c


def sit_config(size: str, arg: str | None = None, *,
               resolution: int = 256) -> ml_collections.ConfigDict:
  """SiT-<size>/2 on ImageNet 256 with SiT's FID protocol: SDE (Euler-Maruyama on
  linspace(0, 0.96, 250) + one mean step), CFG 1.5 on latent channels 0..2.
  """
  c = imagenet_config(size, 1, (1.5,), resolution=resolution, arg=arg)
  c.sample.method = 'sde'
  return c
