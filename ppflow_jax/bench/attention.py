"""Attention formulations timed side by side: how `ops.attention`'s XLA path was chosen.

Candidates, each on q, k, v of (B, L, H, D) (and (B, L) segment ids for the packed variant):
  xla          `ops.attention(impl='xla')`: heads before length, q pre-scaled, late normalisation,
               packed rows masked by one additive (B, 1, L, L) bias;
  xla_select   (packed only) the same with the mask as a select per score (the previous path);
  xla_blockwise (packed only) `ops.attention(impl='xla', row_blocks=...)`: the four aligned
               segments of a row attend as rows of their own, unmasked (what packed training runs);
  einsum_blhd  the textbook formulation on the (B, L, H, D) layout (the project's previous path);
  jax_dpa      `jax.nn.dot_product_attention(implementation='xla')` (boolean mask when packed);
  torch_sdpa   torch's fused `scaled_dot_product_attention` on (B, H, L, D) (if torch is here).
Every candidate is timed in each of `--rounds` interleaved rounds (`--calls` calls each), so load
from other processes spreads over all of them; the median and min-max of the calls are reported.
The default sizes are SiT/PPF-S at a CFG-doubled batch of 16 and the stage lengths 256/128/64.

  python -m ppflow_jax.bench.attention --json=docs/attention_cpu.json --markdown
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ppflow_jax.bench import common
from ppflow_jax.ops import attention as attention_ops


def einsum_blhd(q, k, v, segment_ids):
  """Softmax attention written on the (B, L, H, D) layout, normalised before the product."""
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
  if segment_ids is not None:
    s = jnp.where((segment_ids[:, :, None] == segment_ids[:, None, :])[:, None], s, -jnp.inf)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, axis=-1), v)


def jax_dpa(q, k, v, segment_ids):
  mask = (None if segment_ids is None
          else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None])
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')


def xla_select(q, k, v, segment_ids):
  """`ops.attention`'s XLA formulation with the segment mask as a select on every score."""
  q = q / math.sqrt(q.shape[-1])
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  s = jnp.einsum('bhqd,bhkd->bhqk', q, k)
  if segment_ids is not None:
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    s = jnp.where(same, s, -0.7 * float(np.finfo(np.float32).max))
  e = jnp.exp(s - s.max(axis=-1, keepdims=True))
  out = jnp.einsum('bhqk,bhkd->bhqd', e, v) / e.sum(axis=-1, keepdims=True)
  return out.transpose(0, 2, 1, 3)


def xla_blockwise(q, k, v, segment_ids):
  """`ops.attention` told that every row holds SEGMENTS aligned equal segments."""
  return attention_ops.attention(q, k, v, segment_ids, impl='xla',
                                 row_blocks=((q.shape[0], SEGMENTS),))


SEGMENTS = 4  # samples per packed row (four 64-token 4x4 samples in a 256-token row)
JAX_CANDIDATES = {
    'xla': lambda q, k, v, s: attention_ops.attention(q, k, v, s, impl='xla'),
    'xla_select': xla_select,
    'xla_blockwise': xla_blockwise,
    'einsum_blhd': einsum_blhd,
    'jax_dpa': jax_dpa,
}
PACKED_ONLY = ('xla_select', 'xla_blockwise')  # without segment ids: the same as 'xla'


def _torch_candidate(q, k, v, segment_ids):
  """torch SDPA on copies of the inputs in its (B, H, L, D) layout, or None without torch."""
  try:
    import torch
  except ImportError:
    return None
  tq, tk, tv = (torch.tensor(np.asarray(x)).transpose(1, 2).contiguous() for x in (q, k, v))
  mask = None
  if segment_ids is not None:
    ids = torch.tensor(np.asarray(segment_ids))
    mask = (ids[:, :, None] == ids[:, None, :])[:, None]

  def run():
    with torch.no_grad():
      return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)
  return run


def bench_length(length: int, opts: dict) -> list[dict]:
  """Every candidate at sequence length `length`, unpacked and packed (SEGMENTS equal ones)."""
  b, h, d = opts['batch'], opts['heads'], opts['head_dim']
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (b, length, h, d), jnp.dtype(opts['dtype'])) for key in keys)
  packed = jnp.broadcast_to(
      jnp.repeat(jnp.arange(1, SEGMENTS + 1, dtype=jnp.int32), length // SEGMENTS), (b, length))
  runs = {}
  for seg_name, seg in (('none', None), ('packed', packed)):
    names = [n for n in JAX_CANDIDATES if seg is not None or n not in PACKED_ONLY]
    for name in names:
      compiled = jax.jit(JAX_CANDIDATES[name])
      ref = compiled(q, k, v, seg)
      runs[(name, seg_name)] = lambda c=compiled, s=seg: jax.block_until_ready(c(q, k, v, s))
      if name == 'xla':
        want = np.asarray(ref)
    t = _torch_candidate(q, k, v, seg)
    if t is not None:
      runs[('torch_sdpa', seg_name)] = t
      np.testing.assert_allclose(t().transpose(1, 2).numpy(), want, atol=1e-4, rtol=1e-4)
    for name in names:  # every candidate computes the same thing
      np.testing.assert_allclose(np.asarray(runs[(name, seg_name)]()), want, atol=1e-4, rtol=1e-4)
  times = {key: [] for key in runs}
  for _ in range(opts['rounds']):
    for key, run in runs.items():
      for _ in range(opts['calls']):
        start = time.perf_counter()
        run()
        times[key].append(1e3 * (time.perf_counter() - start))
  return [dict(length=length, candidate=name, segments=seg_name, ms=common.spread(t))
          for (name, seg_name), t in times.items()]


def table(result: dict) -> tuple[list[str], list[list[str]]]:
  names = list(dict.fromkeys(r['candidate'] for r in result['results']))
  headers = ['L', 'segments'] + [f'{n} ms' for n in names] + ['fastest']
  cells = {(r['length'], r['segments'], r['candidate']): r['ms'] for r in result['results']}
  rows = []
  for length in result['options']['lengths']:
    for seg in ('none', 'packed'):
      got = {n: cells[(length, seg, n)] for n in names if (length, seg, n) in cells}
      best = min(got, key=lambda n: got[n]['median'])
      rows.append([str(length), seg] + [
          f"{got[n]['median']:.1f} ({got[n]['min']:.0f}-{got[n]['max']:.0f})" if n in got
          else '-' for n in names] + [best])
  return headers, rows


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  opts = dict(batch=f.batch, heads=f.heads, head_dim=f.head_dim, dtype=f.dtype,
              lengths=[int(x) for x in f.lengths], rounds=f.rounds, calls=f.calls)
  results = [r for length in opts['lengths'] for r in bench_length(length, opts)]
  common.report('attention', opts, results, table,
                f"q, k, v ({opts['batch']}, L, {opts['heads']}, {opts['head_dim']}) "
                f"{opts['dtype']}, {opts['rounds']} interleaved rounds x {opts['calls']} calls, "
                'median (min-max) ms')


if __name__ == '__main__':
  common.define_part_flags(rounds=5, calls=2)
  flags.DEFINE_integer('head_dim', 64, 'Head dim (S/B/L: 64, XL: 72).')
  flags.DEFINE_list('lengths', ['256', '128', '64'], 'Sequence lengths (the stages\' tokens).')
  app.run(main)
