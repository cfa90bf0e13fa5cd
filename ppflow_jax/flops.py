"""Analytic FLOPs of the PPF model: one forward per stage, a sampling run, a training image.

Convention: we count the multiply-adds (MACs) of every matrix product of one forward of ONE
sample, and report FLOPs = 2 x MACs. Elementwise work (LayerNorm, GELU, softmax, modulation,
residual adds, bias adds, positional/label/level embedding lookups) is not counted; it is < 1%
of a DiT forward at d >= 256 (see docs/flops.md, and the XLA cross-check in tests/test_flops.py).

One forward of the PPF model at a stage with L tokens, patch area P = ph * pw, latent channels C,
output channels C_out (2C with learn_sigma), width d, depth N, MLP width r * d, costs in MACs:

  patch embed      L * P * C * d
  timestep MLP     256 * d + d^2                         (per sample, independent of L)
  per block        L * (3d^2 + d^2 + 2 r d^2)            (qkv, proj, MLP: 12 d^2 L at r = 4)
                   + 2 * L^2 * d                         (scores QK^T and AV)
                   + 6 d^2                               (adaLN, per sample)
  final layer      2 d^2 + L * d * P * C_out             (final adaLN, de-embed)

Testing FLOPs of a sampling run = sum over stages of (model evaluations at that stage, as the
sampler really does them, `sampling.evaluations`) x (forward FLOPs of that stage). The paper's
"Testing FLOPs (%)" is that sum relative to the same model forced to its finest patch at every
evaluation (= SiT), without CFG's guidance passes. `cfg=True` (what the run report's speed-up
bound uses) counts them exactly as both samplers run them: the finest-only reference skips the
unconditional pass at the same times as the stage schedule (scale 1.0, `skip_unit_cfg`).

Every model variant has its per-forward count registered with `@register('name')` (dispatch on
`config.model.variant`: 'ppf' here, 'mpdit' from models/mpdit.py); everything above the
per-forward count is shared. Each public function resolves a copy of the config once.

  python -m ppflow_jax.flops --config=configs/ppf_xl_2.py [--json]
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Callable

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from ppflow_jax import config_lib
from ppflow_jax import packing
from ppflow_jax import sampling
from ppflow_jax import stages as stages_lib
from ppflow_jax.models import dit
from ppflow_jax.models import mpdit

# variant -> f(resolved config, its schedule, stage) -> {term: MACs of one forward of one sample}.
ForwardCounter = Callable[[ml_collections.ConfigDict, stages_lib.Schedule, int], dict[str, int]]
FORWARD_COUNTERS: dict[str, ForwardCounter] = {}


def register(variant: str) -> Callable[[ForwardCounter], ForwardCounter]:
  """Registers the per-forward MAC count of `config.model.variant == variant`."""
  def wrap(fn: ForwardCounter) -> ForwardCounter:
    FORWARD_COUNTERS[variant] = fn
    return fn
  return wrap


# -- building blocks, shared by variants ----------------------------------------------------------

def block_macs(d: int, tokens: int, mlp_hidden: int) -> dict[str, int]:
  """MACs of one adaLN-Zero DiT block over `tokens` tokens of one sample (full attention)."""
  return dict(qkv=3 * d * d * tokens, attn_proj=d * d * tokens, mlp=2 * d * mlp_hidden * tokens,
              attn_scores=tokens * tokens * d, attn_values=tokens * tokens * d, adaln=6 * d * d)


def timestep_embedder_macs(d: int) -> int:
  """The 256 -> d -> d timestep MLP (per sample)."""
  return dit.TIME_FREQ_DIM * d + d * d


def _sum_terms(terms: list[dict[str, int]]) -> dict[str, int]:
  out: dict[str, int] = {}
  for t in terms:
    for k, v in t.items():
      out[k] = out.get(k, 0) + v
  return out


@register('ppf')
def ppf_forward_macs(config: ml_collections.ConfigDict, schedule: stages_lib.Schedule,
                     stage: int) -> dict[str, int]:
  """MACs per term of one PPFModel forward of one sample at `stage` (SiT for one stage)."""
  m = config.model
  d, tokens = m.hidden_size, schedule.num_tokens(stage)
  patch_dim = schedule.stages[stage].patch_area * config.latent.channels
  out_dim = patch_dim * (2 if m.learn_sigma else 1)
  blocks = _sum_terms([block_macs(d, tokens, int(d * m.mlp_ratio))] * m.depth)
  return dict(patch_embed=tokens * patch_dim * d,
              timestep_embed=timestep_embedder_macs(d),
              **blocks,
              final_adaln=2 * d * d,
              final_linear=tokens * d * out_dim)


@register('mpdit')
def mpdit_forward_macs(config: ml_collections.ConfigDict, schedule: stages_lib.Schedule,
                       stage: int) -> dict[str, int]:
  """MACs per term of one MPDiT forward of one sample (one stage; attention at real lengths)."""
  del schedule, stage  # MPDiT has one schedule stage
  return mpdit.forward_macs_terms(config, attention='exact')


# -- public API -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Model:
  """A resolved copy of the caller's config (left untouched) and its schedule, built once per
  public call and passed to the counting functions below."""
  config: ml_collections.ConfigDict
  schedule: stages_lib.Schedule

  @classmethod
  def of(cls, config: ml_collections.ConfigDict) -> '_Model':
    config = config_lib.resolve(copy.deepcopy(config))
    return cls(config, stages_lib.from_config(config))


def _counter(config: ml_collections.ConfigDict) -> ForwardCounter:
  variant = config.model.variant
  if variant not in FORWARD_COUNTERS:
    raise ValueError(f'flops.py has no FLOPs count for config.model.variant={variant!r}; '
                     f'known: {sorted(FORWARD_COUNTERS)}. Add one with @flops.register({variant!r}).')
  return FORWARD_COUNTERS[variant]


def forward_flops(config: ml_collections.ConfigDict, stage: int) -> dict:
  """One forward of one sample at `stage` -> {stage, patch, tokens, macs, flops, terms}.

  `terms` maps each counted matrix product (see the module docstring) to its MACs.
  """
  return _forward(_Model.of(config), stage)


def _forward(m: _Model, stage: int) -> dict:
  if not 0 <= stage < len(m.schedule):
    raise ValueError(f'stage {stage} does not exist: the schedule has {len(m.schedule)} stages '
                     f'(0 = coarsest .. {len(m.schedule) - 1} = finest)')
  terms = _counter(m.config)(m.config, m.schedule, stage)
  macs = sum(terms.values())
  return dict(stage=stage, patch=m.schedule.stages[stage].patch,
              tokens=m.schedule.num_tokens(stage), macs=macs, flops=2 * macs, terms=terms)


def sampling_flops(config: ml_collections.ConfigDict,
                   spec: sampling.SamplerSpec | None = None) -> dict:
  """FLOPs of sampling ONE image with `spec` (default: `config.sample`).

  Returns {stages: [{stage, patch, tokens, evaluations, passes, forward_flops, flops}], evaluations,
  macs, flops, flops_with_cfg}. `evaluations` are model evaluations per stage as the sampler runs
  them (`sampling.num_evaluations`); `passes` are the forward passes at that stage including the
  guidance ones (`sampling.forward_passes`: none at scale 1.0 with `skip_unit_cfg`, at every
  evaluation of the finest-only reference exactly where the stage schedule runs them).
  """
  m = _Model.of(config)
  return _sampling(m, spec or sampling.SamplerSpec.from_config(m.config))


def _sampling(m: _Model, spec: sampling.SamplerSpec) -> dict:
  schedule = m.schedule
  evals = sampling.num_evaluations(schedule, spec)
  passes = sampling.forward_passes(schedule, spec)
  rows = []
  for s in range(len(schedule)):
    fwd = _forward(m, s)
    rows.append(dict(stage=s, patch=fwd['patch'], tokens=fwd['tokens'], evaluations=evals[s],
                     passes=passes[s], forward_flops=fwd['flops'],
                     flops=evals[s] * fwd['flops']))
  flops = sum(r['flops'] for r in rows)
  return dict(stages=rows, evaluations=sum(evals), macs=flops // 2, flops=flops,
              flops_with_cfg=sum(r['passes'] * r['forward_flops'] for r in rows))


def testing_flops_ratio(config: ml_collections.ConfigDict,
                        spec: sampling.SamplerSpec | None = None, *, cfg: bool = False) -> float:
  """FLOPs of a sampling run relative to the same model forced to its finest patch (a fraction).

  The paper's "Testing FLOPs (%)" / 100. `cfg=True` counts CFG passes on both sides instead.
  """
  m = _Model.of(config)
  return _testing_ratio(m, spec or sampling.SamplerSpec.from_config(m.config), cfg)


def _testing_ratio(m: _Model, spec: sampling.SamplerSpec, cfg: bool) -> float:
  key = 'flops_with_cfg' if cfg else 'flops'
  ours = _sampling(m, dataclasses.replace(spec, force_finest=False))[key]
  finest = _sampling(m, dataclasses.replace(spec, force_finest=True))[key]
  return ours / finest


def time_weighted_ratio(config: ml_collections.ConfigDict) -> float:
  """The ratio with each stage weighted by its time range (the limit of infinitely many steps)."""
  return _time_weighted(_Model.of(config))


def _time_weighted(m: _Model) -> float:
  finest = _forward(m, len(m.schedule) - 1)['flops']
  return sum((s.t_end - s.t_start) * _forward(m, s.index)['flops']
             for s in m.schedule.stages) / finest


def training_flops(config: ml_collections.ConfigDict, batch_size: int | None = None) -> dict:
  """Training FLOPs per image: 3 x forward (forward + backward), stage buckets of the batch.

  Returns {bucket_sizes, flops_per_image, finest_flops_per_image, ratio} and, for PPF training
  with Patch n' Pack, what a packed step computes: `packed_flops_per_image` with the `xla`
  attention told the rows' layout (each sample slot attends alone; the padding tokens of a
  stage's last row are computed too), `packed_dense_flops_per_image` with the segment-id kernels
  (splash, pallas_gpu), where a packed row's attention costs its full length squared.
  """
  return _training(_Model.of(config), batch_size)


def _training(m: _Model, batch_size: int | None) -> dict:
  config, schedule = m.config, m.schedule
  batch = batch_size or config.train.batch_size
  sizes = schedule.bucket_sizes(batch)
  fwd = [_forward(m, s) for s in range(len(schedule))]
  per_image = 3 * sum(n * f['flops'] for n, f in zip(sizes, fwd)) / batch
  finest = 3 * fwd[-1]['flops']
  out = dict(bucket_sizes=sizes, flops_per_image=per_image, finest_flops_per_image=finest,
             ratio=per_image / finest)
  if config.model.variant == 'ppf' and len(schedule) > 1:
    mc = config.model
    d, hidden = mc.hidden_size, int(mc.hidden_size * mc.mlp_ratio)
    lengths = [f['tokens'] for f in fwd]
    plan = packing.make_plan(sizes, tuple(lengths))
    row = plan.row_length
    padding = dense = 0  # MACs a packed forward adds over the per-sample count
    for s, (n, length) in enumerate(zip(sizes, lengths)):
      rows, slots = plan.rows(s), plan.rows(s) * plan.per_row(s)
      per_token = 4 * d * d + 2 * d * hidden
      linear = per_token * (rows * row - n * length)
      padding += mc.depth * (2 * d * (slots - n) * length * length + linear)
      dense += mc.depth * (2 * d * (rows * row * row - n * length * length) + linear)
    out['packed_flops_per_image'] = per_image + 3 * 2 * padding / batch
    out['packed_dense_flops_per_image'] = per_image + 3 * 2 * dense / batch
  return out


def report(config: ml_collections.ConfigDict, spec: sampling.SamplerSpec | None = None) -> dict:
  """Everything the CLI prints, as plain JSON-able values."""
  m = _Model.of(config)
  config = m.config
  spec = spec or sampling.SamplerSpec.from_config(config)
  run = _sampling(m, spec)
  for row in run['stages']:
    row['patch'] = list(row['patch'])
  ratio = _testing_ratio(m, spec, cfg=False)
  return dict(variant=config.model.variant, size=config.model.size,
              latent=[config.latent.height, config.latent.width, config.latent.channels],
              sampler=dataclasses.asdict(spec), convention='FLOPs = 2 x multiply-adds, per sample',
              sampling=run, testing_flops_ratio=ratio, speedup_bound=1.0 / ratio,
              testing_flops_ratio_with_cfg=_testing_ratio(m, spec, cfg=True),
              time_weighted_ratio=_time_weighted(m), training=_training(m, None))


def format_table(rep: dict) -> str:
  """A plain-text table of `report()`."""
  lines = [f"{rep['variant']}-{rep['size']} on a {'x'.join(map(str, rep['latent']))} latent, "
           f"{rep['sampler']['method']} with {rep['sampler']['num_steps']} grid points "
           f"({rep['convention']})",
           f"{'stage':>5} {'patch':>7} {'tokens':>6} {'GFLOPs/fwd':>11} {'evals':>6} "
           f"{'CFG passes':>10} {'share':>6}"]
  total = rep['sampling']['flops']
  for r in rep['sampling']['stages']:
    lines.append(f"{r['stage']:>5} {'x'.join(map(str, r['patch'])):>7} {r['tokens']:>6} "
                 f"{r['forward_flops'] / 1e9:>11.3f} {r['evaluations']:>6} {r['passes']:>10} "
                 f"{r['flops'] / total:>6.1%}")
  tr = rep['training']
  lines += [
      f"sampling one image: {total / 1e12:.3f} TFLOPs ({rep['sampling']['flops_with_cfg'] / 1e12:.3f} "
      'with CFG passes)',
      f"testing FLOPs vs finest patch: {rep['testing_flops_ratio']:.1%} (speedup bound "
      f"{rep['speedup_bound']:.2f}x; time-weighted {rep['time_weighted_ratio']:.1%}; with CFG "
      f"passes {rep['testing_flops_ratio_with_cfg']:.1%})",
      f"training: {tr['flops_per_image'] / 1e9:.1f} GFLOPs per image (buckets "
      f"{list(tr['bucket_sizes'])}), {tr['ratio']:.1%} of the finest patch"]
  if 'packed_dense_flops_per_image' in tr:
    lines.append(f"  packed rows: {tr['packed_flops_per_image'] / 1e9:.1f} GFLOPs per image (xla "
                 f"attention), {tr['packed_dense_flops_per_image'] / 1e9:.1f} (segment-id kernels)")
  return '\n'.join(lines)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  rep = report(flags.FLAGS.config)
  print(json.dumps(rep, indent=2) if flags.FLAGS.json else format_table(rep))


def console() -> None:
  # Flags are defined only when run as a command: main.py defines its own --config.
  from ppflow_jax import cli  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file (get_config()).', lock_config=True)
  flags.DEFINE_bool('json', False, 'Print JSON instead of a table.')
  flags.mark_flags_as_required(['config'])
  cli.run(main)


if __name__ == '__main__':
  console()
