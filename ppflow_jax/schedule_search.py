"""Choosing the stage schedule for a sampling budget after training (beyond the paper).

A model trained in the FlexiDiT (or Lumina) regime has seen every patch at every t, so any
schedule over its patches is usable; a `ppflow`-regime model only knows each patch on its own
trained time range, and the search keeps to those ranges (and says so). The search:

1. enumerates candidates: an increasing subset of the model's stages (coarsest first, so each
   candidate stage picks a patch the model has projections for) and boundaries on a grid;
2. prices each with flops.py, relative to the model's finest patch at every evaluation under
   `config.sample`'s sampler: by default the FLOPs as the samplers run them, CFG passes
   included (`price='as_run'`), or the paper's "Testing FLOPs", which leave them out
   (`price='testing'`; a schedule can then buy quality by moving guided stages earlier);
3. scores each with a cheap proxy from the model itself: on held-out images x1 and noise x0, at
   `num_times` midpoint times t, the guided velocity of every model stage at x_t against the
   finest stage's, mean squared; a candidate's proxy is the mean over t of its stage's error
   (computed once per stage and time, so every candidate is scored for free);
4. confirms the best few under each budget, the finest-only reference and the paper's hand-set
   schedules (those whose patches the model has) with the real metric, the Fashion-MNIST FID of
   sampled images for each sampling seed (mean and spread), and times them side by side in one
   process;
5. writes `search.json`, `override.txt` (the chosen schedule as config overrides) and
   `pareto.png` (FLOPs vs proxy, and FLOPs vs FID of the confirmed ones, hand-set ones marked).

  python -m ppflow_jax.schedule_search --config=configs/default_flexidit.py --workdir=RUN \\
      --budget=0.5          # or hand (the config's own schedule's FLOPs), PPF-2, PPF-3 (a
                            # hand-set schedule's), or several: --budget=PPF-2,PPF-3

A candidate that uses a subset of the model's stages samples through `StageMap` (candidate
stage i runs model stage `stages[i]`); the override string applies as is only to candidates that
use every model stage (otherwise search.json says which model stage each candidate stage uses).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags
from flax import nnx

from ppflow_jax import config_lib
from ppflow_jax import flops
from ppflow_jax import flow
from ppflow_jax import inference
from ppflow_jax import paths
from ppflow_jax import report
from ppflow_jax import sampling
from ppflow_jax import stages as stages_lib

# Regimes that train every patch at every t (flow.sample_times): any schedule is in range.
ALL_TIME_REGIMES = ('flexidit', 'lumina')


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A schedule over the model's stages: candidate stage i runs model stage `stages[i]` on
  (edges[i], edges[i + 1]] with edges = (0, *boundaries, 1)."""
  stages: tuple[int, ...]
  boundaries: tuple[float, ...]

  def edges(self) -> tuple[float, ...]:
    return (0.0,) + self.boundaries + (1.0,)

  def label(self, config: ml_collections.ConfigDict) -> str:
    patches = ' | '.join('x'.join(map(str, config.schedule.patch_sizes[s])) for s in self.stages)
    return f"{patches} @ {', '.join(f'{b:g}' for b in self.boundaries) or '-'}"


def trained_ranges(config: ml_collections.ConfigDict) -> list[tuple[float, float]]:
  """Time range each model stage was trained on: its own stage range in the 'ppflow' regime,
  [0, 1] for regimes that train every patch at every t."""
  schedule = stages_lib.from_config(config)
  if config.train.regime in ALL_TIME_REGIMES:
    return [(0.0, 1.0)] * len(schedule)
  return [(s.t_start, s.t_end) for s in schedule.stages]


def candidate_config(config: ml_collections.ConfigDict, c: Candidate) -> ml_collections.ConfigDict:
  """`config` with the candidate's schedule (patches and CFG scales of its model stages)."""
  out = ml_collections.ConfigDict(config.to_dict())
  sc = config.schedule
  out.schedule.patch_sizes = tuple(tuple(sc.patch_sizes[s]) for s in c.stages)
  out.schedule.cfg_scales = tuple(sc.cfg_scales[s] for s in c.stages)
  out.schedule.boundaries = c.boundaries
  return out


def enumerate_candidates(config: ml_collections.ConfigDict, grid: float,
                         max_stages: int) -> list[Candidate]:
  """Every valid candidate: model-stage subsets of up to `max_stages`, boundaries on multiples
  of `grid`, each candidate stage inside its model stage's trained range."""
  n = len(config.schedule.patch_sizes)
  points = [round(k * grid, 10) for k in range(1, int(round(1 / grid)))]
  out = []
  for k in range(1, min(max_stages, n) + 1):
    for subset in itertools.combinations(range(n), k):
      for bounds in itertools.combinations(points, k - 1):
        c = Candidate(subset, tuple(bounds))
        if in_trained_ranges(config, c):
          out.append(c)
  return out


def in_trained_ranges(config: ml_collections.ConfigDict, c: Candidate) -> bool:
  """Whether each stage of `c` runs its model stage only on times that stage was trained on."""
  ranges, edges = trained_ranges(config), c.edges()
  return all(ranges[s][0] - 1e-9 <= edges[i] and edges[i + 1] <= ranges[s][1] + 1e-9
             for i, s in enumerate(c.stages))


def flops_ratio(config: ml_collections.ConfigDict, c: Candidate,
                finest_flops: float | None = None, key: str = 'flops') -> float:
  """Testing FLOPs of sampling with `c` over the model's finest patch at every evaluation;
  key='flops_with_cfg' counts CFG passes on both sides (flops.testing_flops_ratio's cfg=True)."""
  if finest_flops is None:
    finest_flops = finest_reference_flops(config, key)
  return flops.sampling_flops(candidate_config(config, c))[key] / finest_flops


def finest_reference_flops(config: ml_collections.ConfigDict, key: str = 'flops') -> float:
  spec = sampling.SamplerSpec.from_config(config, force_finest=True)
  return flops.sampling_flops(config, spec)[key]


class StageMap(nnx.Module):
  """The model with candidate stage i served by model stage `stages[i]`."""

  def __init__(self, model: nnx.Module, stages: tuple[int, ...]):
    self.model = model
    self.stages = tuple(stages)

  def __call__(self, x, t, y, stage: int):
    return self.model(x, t, y, self.stages[stage])


def velocity_errors(model: inference.Inference, images: np.ndarray, labels: np.ndarray,
                    times: np.ndarray, seed: int = 0) -> np.ndarray:
  """Mean squared difference of each model stage's guided velocity from the finest stage's.

  images: (N, H, W, C) held-out data x1 in the model's latent space; labels: (N,); times: (T,)
  -> (num_stages, T). CFG scales are the config's per model stage (the finest's for the
  reference); x_t = (1 - t) x0 + t x1 with x0 from `seed`.
  """
  config = model.config
  num_stages = len(model.schedule)
  scales = tuple(float(s) for s in config.schedule.cfg_scales)
  null = config.model.num_classes

  @jax.jit
  def all_stages(params, x, t, y):
    net = nnx.merge(model.graphdef, params)
    tb = jnp.full((x.shape[0],), t)

    def guided(stage):
      cond = net(x, tb, y, stage)
      if scales[stage] == 1.0:
        return cond
      uncond = net(x, tb, jnp.full_like(y, null), stage)
      return uncond + scales[stage] * (cond - uncond)
    vs = [guided(s) for s in range(num_stages)]
    return jnp.stack([jnp.mean(jnp.square(v - vs[-1])) for v in vs])

  x1 = jnp.asarray(images, jnp.float32)
  x0 = jax.random.normal(jax.random.key(seed), x1.shape)
  y = jnp.asarray(labels, jnp.int32)
  cols = [np.asarray(all_stages(model.params, flow.interpolate(x0, x1, jnp.full((len(x1),), t)),
                                jnp.float32(t), y)) for t in times]
  return np.stack(cols, axis=1)


def proxy_score(c: Candidate, errors: np.ndarray, times: np.ndarray) -> float:
  """Mean over `times` of the error of the model stage `c` runs at each time (a boundary time
  belongs to the coarser stage, as in the sampler)."""
  edges = c.edges()
  idx = [min(np.searchsorted(edges[1:-1], t, side='left'), len(c.stages) - 1) for t in times]
  return float(np.mean([errors[c.stages[i], k] for k, i in enumerate(idx)]))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
  """Indices of points not dominated in (cost, error), both lower-better, by cost."""
  order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
  front, best = [], float('inf')
  for i in order:
    if points[i][1] < best:
      front.append(i)
      best = points[i][1]
  return front


def hand_set(config: ml_collections.ConfigDict) -> dict[str, Candidate]:
  """The paper's schedules (config_lib.SCHEDULES, PPF-2 / PPF-3) whose patches the model has."""
  patches = [tuple(p) for p in config.schedule.patch_sizes]
  out = {}
  for label, n in config_lib.PAPER_MODELS.values():
    sched = config_lib.SCHEDULES[n]
    if n > 1 and all(tuple(p) in patches for p in sched['patch_sizes']):
      out[label] = Candidate(tuple(patches.index(tuple(p)) for p in sched['patch_sizes']),
                             tuple(sched['boundaries']))
  return out


def budget_ratio(config: ml_collections.ConfigDict, budget: float | str,
                 named: dict[str, Candidate], finest: float, key: str = 'flops') -> float:
  """`budget` as a fraction of finest-patch FLOPs (`key` of flops.sampling_flops): a number as
  is, a name of `named` as that schedule's FLOPs ratio."""
  if isinstance(budget, str):
    if budget not in named:
      raise ValueError(f'--budget={budget!r} is neither a number nor one of {sorted(named)} '
                       '(the hand-set schedules whose patches this model has)')
    return flops_ratio(config, named[budget], finest, key)
  return float(budget)


def override_string(config: ml_collections.ConfigDict, c: Candidate) -> str:
  """Config overrides that sample `c` with this model (valid when `c` uses every model stage;
  the schedule is a guarded checkpoint field, hence allow_model_mismatch)."""
  cc = candidate_config(config, c)
  return (f"--config.schedule.boundaries='{tuple(cc.schedule.boundaries)}' "
          f"--config.schedule.cfg_scales='{tuple(cc.schedule.cfg_scales)}' "
          '--config.checkpoint.allow_model_mismatch=True')


def candidate_sampler(model: inference.Inference, c: Candidate, **spec_overrides):
  """(sampler, state) sampling `c` with `model`'s weights through StageMap."""
  cc = config_lib.resolve(candidate_config(model.config, c))
  net = StageMap(nnx.merge(model.graphdef, model.params), c.stages)
  graphdef, state = nnx.split(net)
  mapped = inference.Inference(cc, graphdef, state, stages_lib.from_config(cc), model.mesh,
                               model.step)
  return mapped.sampler(**spec_overrides), state


def sampling_labels(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
  """Class-balanced labels (num_samples,) in an order drawn from `seed`."""
  return np.random.default_rng(seed).permutation(np.arange(num_samples) % num_classes
                                                 ).astype(np.int32)


def confirm(model: inference.Inference, named: dict[str, Candidate], evaluator, num_samples: int,
            timing_repeats: int = 3, seeds: tuple[int, ...] = (0,)) -> dict[str, dict]:
  """Per candidate: the FID (if `evaluator`) of `num_samples` samples for each sampling seed
  (its own noise and label order), their mean and spread, and the steady seconds per batch
  (timed once, on the first seed's batches), side by side in this process."""
  config = model.config
  bs, out = config.sample.batch_size, {}
  first_name = {}
  for name, c in named.items():
    if c in first_name:  # a searched schedule that is also a hand-set one is sampled once
      out[name] = dict(out[first_name[c]], same_schedule_as=first_name[c])
      continue
    first_name[c] = name
    sampler, state = candidate_sampler(model, c)
    fids, row = [], dict(batch_size=bs, seeds=list(seeds))
    for k, seed in enumerate(seeds):
      labels = sampling_labels(num_samples, config.model.num_classes, seed)
      images, timings = sampling.sample_in_chunks(sampler, state, model.latent_shape, labels,
                                                  seed, bs)
      if k == 0:
        steady = sampling.steady_timings(sampler, state, model.latent_shape, labels, bs, timings,
                                         timing_repeats)
        row['batch_seconds'] = float(np.median([t.seconds for t in steady]))
      if evaluator is not None:
        fids.append(float(evaluator.score(np.clip(images, -1.0, 1.0), labels)['fid']))
    if fids:
      row.update(fid=float(np.mean(fids)), fid_std=float(np.std(fids, ddof=1)) if len(fids) > 1
                 else 0.0, fid_per_seed=fids)
    out[name] = row
  return out


# What a candidate costs: flops.sampling_flops's key, and its name in tables and plots.
PRICES = {'as_run': ('flops_with_cfg', 'FLOPs as run (CFG passes)'),
          'testing': ('flops', 'Testing FLOPs')}


@dataclasses.dataclass(frozen=True)
class SearchSettings:
  # Fraction of finest-patch FLOPs (priced by `price`), 'hand' (the config's own schedule's) or a hand-set
  # schedule's label ('PPF-2', 'PPF-3': its FLOPs on this model); or a tuple of those, searched
  # together (the proxy and the hand-set / finest rows are shared).
  budget: float | str | tuple = 0.5
  grid: float = 0.125           # boundary grid
  max_stages: int = 3
  num_times: int = 32           # proxy time points (bin midpoints)
  proxy_images: int = 64        # held-out images for the proxy
  confirm: int = 3              # best candidates under the budget confirmed with FID
  num_samples: int = 200        # samples per confirmed candidate for the FID
  timing_repeats: int = 3       # timed batches per confirmed candidate (after compiling)
  seed: int = 0                 # proxy noise and held-out images
  sampling_seeds: tuple[int, ...] = (0,)  # FID of each confirmed candidate per seed
  price: str = 'as_run'         # a key of PRICES

  def __post_init__(self):
    if self.price not in PRICES:
      raise ValueError(f'price={self.price!r} is not one of {sorted(PRICES)}')


def search(model: inference.Inference, heldout: tuple[np.ndarray, np.ndarray],
           settings: SearchSettings, evaluator=None) -> dict:
  """The whole search on `model` with held-out (images, labels); returns the JSON-able result."""
  config = model.config
  key = PRICES[settings.price][0]
  finest = finest_reference_flops(config, key)
  finest_cfg = finest_reference_flops(config, 'flops_with_cfg')
  own = Candidate(tuple(range(len(model.schedule))), tuple(model.schedule.boundaries))
  hand = hand_set(config)
  budget_args = (tuple(settings.budget) if isinstance(settings.budget, (tuple, list))
                 else (settings.budget,))
  times = (np.arange(settings.num_times) + 0.5) / settings.num_times
  images, labels = heldout
  errors = velocity_errors(model, images[:settings.proxy_images],
                           labels[:settings.proxy_images], times, settings.seed)
  rows = []
  for c in enumerate_candidates(config, settings.grid, settings.max_stages):
    rows.append(dict(stages=list(c.stages), boundaries=list(c.boundaries), label=c.label(config),
                     flops_ratio=flops_ratio(config, c, finest, key),
                     proxy=proxy_score(c, errors, times)))
  for i in pareto_front([(r['flops_ratio'], r['proxy']) for r in rows]):
    rows[i]['pareto'] = True
  as_candidate = lambda r: Candidate(tuple(r['stages']), tuple(r['boundaries']))
  named, budgets = {}, []
  for arg in budget_args:
    ratio = budget_ratio(config, arg, dict(hand, hand=own), finest, key)
    within = sorted((r for r in rows if r['flops_ratio'] <= ratio + 1e-9), key=lambda r: r['proxy'])
    if not within:
      raise ValueError(f'no candidate schedule fits --budget={arg} ({ratio:.3f} of the '
                       'finest-patch FLOPs); raise the budget or refine --grid')
    tag = arg if isinstance(arg, str) else f'{ratio:.3f}'
    searched = {f"searched #{i + 1} at {tag}: {r['label']}": as_candidate(r)
                for i, r in enumerate(within[:settings.confirm])}
    named.update(searched)
    budgets.append(dict(arg=arg, ratio=ratio, num_within_budget=len(within),
                        searched=list(searched)))
  # References outside the trained ranges (the finest patch alone, for a ppflow-regime model)
  # are left out, as the search leaves out such candidates.
  finest_only = Candidate((len(model.schedule) - 1,), ())
  references = {f'hand-set {k}: {c.label(config)}': c for k, c in hand.items()}
  references[f'finest only: {finest_only.label(config)}'] = finest_only
  named.update({k: c for k, c in references.items() if in_trained_ranges(config, c)})
  confirmed = confirm(model, named, evaluator, settings.num_samples, settings.timing_repeats,
                      tuple(settings.sampling_seeds))
  for name, c in named.items():
    # With price='testing' (no CFG passes) a schedule that moves guided stages earlier costs more
    # as run than its price says; flops_ratio_with_cfg records what it costs as run.
    confirmed[name].update(flops_ratio=flops_ratio(config, c, finest, key),
                           flops_ratio_with_cfg=flops_ratio(config, c, finest_cfg,
                                                            'flops_with_cfg'),
                           proxy=proxy_score(c, errors, times), stages=list(c.stages),
                           boundaries=list(c.boundaries))
  metric = 'fid' if evaluator is not None else 'proxy'
  for b in budgets:
    b['chosen'] = min(b['searched'], key=lambda n: confirmed[n][metric])
    chosen = named[b['chosen']]
    b['override'] = (override_string(config, chosen) if len(chosen.stages) == len(model.schedule)
                     else None)
  ranges = ', '.join(f"{'x'.join(map(str, p))} on [{a:g}, {b:g}]"
                     for p, (a, b) in zip(config.schedule.patch_sizes, trained_ranges(config)))
  restricted = config.train.regime not in ALL_TIME_REGIMES
  return dict(
      budgets=budgets, settings=dataclasses.asdict(settings), regime=config.train.regime,
      restriction=(f'restricted to the trained ranges ({ranges}): only schedules inside them are '
                   'searched or confirmed' if restricted else
                   'every patch was trained at every t: any schedule is searched'),
      num_candidates=len(rows), times=times.tolist(), stage_errors=errors.tolist(),
      candidates=rows, confirmed=confirmed, chosen_by=metric, device=str(jax.devices()[0]),
      cpu_count=os.cpu_count())


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}{'s' * (n != 1)}"


def markdown(result: dict) -> str:
  """The search's budgets and its confirmed schedules as Markdown (the docs table, rendered by
  `python -m ppflow_jax.tables`)."""
  rows = result['confirmed']
  first = next(iter(rows.values()))
  price = PRICES[result['settings'].get('price', 'testing')][1]
  chosen = {b['chosen'] for b in result['budgets']}
  cell = lambda name: name.replace('|', '\\|')  # patch labels hold '|'
  lines = [f"Regime `{result['regime']}`: {result['restriction']}; "
           f"{_count(result['num_candidates'], 'candidate')}."] + [
      f"Budget {b['arg']} = {b['ratio']:.3f} of the finest-patch {price}: "
      f"{_count(b['num_within_budget'], 'candidate')} within it; chosen by "
      f"{result['chosen_by']}: {cell(b['chosen'])}." for b in result['budgets']] + [
      '', f"| schedule | {price} / finest | proxy (velocity MSE vs finest) | FID, mean ± std "
      f"over sampling seeds {','.join(map(str, first['seeds']))} "
      f"({result['settings']['num_samples']} samples each) | FID per seed | "
      f"s / batch of {first['batch_size']} |", '|---|---|---|---|---|---|']
  for name, r in rows.items():
    fid = f"{r['fid']:.2f} ± {r['fid_std']:.2f}" if 'fid' in r else '-'
    per_seed = ', '.join(f'{f:.1f}' for f in r.get('fid_per_seed', [])) or '-'
    seconds = (f"= {r['same_schedule_as'].split(':')[0]}" if 'same_schedule_as' in r
               else f"{r['batch_seconds']:.2f}")
    lines.append(f"| {cell(name)}{' **(chosen)**' if name in chosen else ''} | "
                 f"{r['flops_ratio']:.3f} | {r['proxy']:.4f} | {fid} | {per_seed} | {seconds} |")
  return '\n'.join(lines)


def pareto_plot(result: dict, path: str) -> None:
  """FLOPs vs proxy (all candidates, Pareto front, budget) and FLOPs vs FID (confirmed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  has_fid = any('fid' in r for r in result['confirmed'].values())
  fig, axes = plt.subplots(1, 2 if has_fid else 1, figsize=(11 if has_fid else 6, 4.2),
                           squeeze=False)
  ax = axes[0, 0]
  rows = result['candidates']
  ax.scatter([r['flops_ratio'] for r in rows], [r['proxy'] for r in rows], s=10, c='0.6',
             label='candidates')
  front = sorted((r for r in rows if r.get('pareto')), key=lambda r: r['flops_ratio'])
  ax.plot([r['flops_ratio'] for r in front], [r['proxy'] for r in front], 'b.-', label='Pareto front')
  chosen = {b['chosen'] for b in result['budgets']}
  for b in result['budgets']:
    ax.axvline(b['ratio'], color='k', ls=':', label=f"budget {b['arg']} = {b['ratio']:.3f}")
  for name, r in result['confirmed'].items():
    marker = '*' if name.startswith('hand-set') else ('o' if name in chosen else 'x')
    for a, y in ((ax, 'proxy'), (axes[0, 1] if has_fid else None, 'fid')):
      if a is not None and y in r:
        a.scatter([r['flops_ratio']], [r[y]], marker=marker, s=80, label=name)
    if has_fid and r.get('fid_std'):  # the spread over sampling seeds
      axes[0, 1].errorbar([r['flops_ratio']], [r['fid']], yerr=[r['fid_std']], fmt='none',
                          ecolor='0.5', capsize=3)
  xlabel = PRICES[result['settings'].get('price', 'testing')][1] + ' / finest patch'
  ax.set_xlabel(xlabel)
  ax.set_ylabel('proxy: velocity MSE vs finest patch')
  ax.set_yscale('symlog', linthresh=1e-4)
  ax.legend(fontsize=6)
  if has_fid:
    axes[0, 1].set_xlabel(xlabel)
    axes[0, 1].set_ylabel('Fashion-MNIST FID (mean ± std over sampling seeds)')
    axes[0, 1].legend(fontsize=6)
  fig.tight_layout()
  report.save_figure(fig, path, dpi=110)


def heldout_fashion_mnist(config: ml_collections.ConfigDict, n: int,
                          seed: int) -> tuple[np.ndarray, np.ndarray]:
  """n Fashion-MNIST test images in [-1, 1] (32, 32, 1) and labels: data the model never saw."""
  from ppflow_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  if (config.latent.height, config.latent.width, config.latent.channels) != (32, 32, 1):
    raise ValueError('schedule_search scores the proxy on Fashion-MNIST test images, which need '
                     f'a 32x32x1 latent; this config has {tuple(config.latent.values())}')
  images, labels = fashion_mnist.load(config.data.path, 'test')
  pick = np.random.default_rng(seed).permutation(len(images))[:n]
  return images[pick].astype(np.float32) / 127.5 - 1.0, labels[pick]


def run(config: ml_collections.ConfigDict, workdir: str, settings: SearchSettings,
        out_dir: str = '', fid_cache: str = '') -> dict:
  """Loads `workdir`'s weights, searches, writes search.json / override.txt / pareto.png."""
  from ppflow_jax.experiments import compare  # pylint: disable=g-import-not-at-top
  config = config_lib.resolve(config)
  model = inference.Inference.from_workdir(workdir, config)
  out_dir = out_dir or paths.join(workdir, 'schedule_search')
  paths.makedirs(out_dir)
  evaluator = compare.make_evaluator(fid_cache or paths.join(workdir, 'fmnist_classifier'),
                                     quick=False)
  t0 = time.time()
  result = search(model, heldout_fashion_mnist(config, settings.proxy_images, settings.seed),
                  settings, evaluator)
  result['seconds'] = time.time() - t0
  write_results(result, out_dir)
  return result


def write_results(result: dict, out_dir: str) -> None:
  """search.json, override.txt and pareto.png in `out_dir` (a local path or a URL)."""
  paths.write_text(paths.join(out_dir, 'search.json'), json.dumps(result, indent=2))
  paths.write_text(paths.join(out_dir, 'override.txt'), ''.join(
      f"# budget {b['arg']}: {b['chosen']}\n" + (b['override'] or 'the chosen schedule uses a '
                                                 'subset of the model stages; see search.json')
      + '\n' for b in result['budgets']))
  pareto_plot(result, paths.join(out_dir, 'pareto.png'))


def _number_or_name(budget: str) -> float | str:
  try:
    return float(budget)
  except ValueError:
    return budget


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  settings = SearchSettings(budget=tuple(_number_or_name(b) for b in f.budget), grid=f.grid,
                            max_stages=f.max_stages, confirm=f.confirm,
                            num_samples=f.num_samples, seed=f.seed,
                            sampling_seeds=tuple(int(s) for s in f.sampling_seeds), price=f.price)
  result = run(f.config, f.workdir, settings, f.out, f.fid_cache)
  print(json.dumps({k: result[k] for k in ('budgets', 'regime', 'restriction', 'num_candidates')},
                   indent=2))
  for name, r in result['confirmed'].items():
    print(f"{name:55s} FLOPs {r['flops_ratio']:.3f}  proxy {r['proxy']:.4f}  "
          f"FID {r.get('fid', float('nan')):.2f} ± {r.get('fid_std', float('nan')):.2f}  "
          f"{r['batch_seconds']:.3f} s/batch")


if __name__ == '__main__':
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from ppflow_jax import cli  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file of the trained model.')
  flags.DEFINE_string('workdir', None, 'The trained run (checkpoints or converted params).')
  flags.DEFINE_list('budget', ['0.5'], "Budgets, each a fraction of finest-patch FLOPs (--price), "
                    "'hand' (the config's own schedule's FLOPs) or a hand-set schedule's ('PPF-2', "
                    "'PPF-3'); one search, confirmed rows shared.")
  flags.DEFINE_float('grid', 0.125, 'Boundary grid step.')
  flags.DEFINE_integer('max_stages', 3, 'Most stages per candidate.')
  flags.DEFINE_integer('confirm', 3, 'Best candidates under the budget confirmed with the FID.')
  flags.DEFINE_integer('num_samples', 200, 'Samples per confirmed schedule for the FID.')
  flags.DEFINE_integer('seed', 0, 'Seed of the proxy noise and held-out images.')
  flags.DEFINE_list('sampling_seeds', ['0'], 'Sampling seeds of the FID of each confirmed '
                    'schedule (own noise and label order each); mean and spread reported.')
  flags.DEFINE_enum('price', 'as_run', list(PRICES), "What a schedule costs: 'as_run' = FLOPs "
                    "as the samplers run them (CFG passes included), 'testing' = the paper's "
                    'Testing FLOPs (no CFG passes).')
  flags.DEFINE_string('out', '', 'Output directory (default WORKDIR/schedule_search).')
  flags.DEFINE_string('fid_cache', '', 'Fashion-MNIST classifier cache (default in WORKDIR).')
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main)
