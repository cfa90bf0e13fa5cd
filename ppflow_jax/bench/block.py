"""The DiT block part by part, this project (JAX) vs the PyTorch reference, side by side.

Where does a forward spend its time, and is each part as fast as PyTorch's? Every part runs on
the same weights (the torch modules' init copied into the project's modules) and inputs, is
checked equal first, and is timed in interleaved rounds (`common.interleaved`: each round calls
every run once, so load from other processes hits all of them):
  norm_modulate   layer norm (no affine, statistics in float32) then `x * (1 + scale) + shift`;
  gelu            tanh-GELU on the MLP's hidden activations (B, L, 4d);
  mlp             fc1, tanh-GELU, fc2;
  attention       fused qkv, softmax attention (`ops.attention`, 'xla' on CPU; torch's fused
                  SDPA), output projection;
  modulation      the adaLN linear on silu(c) and its broadcast over the tokens;
  block           the whole adaLN-Zero block;
  block_packed    the block on packed rows (as packing.PackPlan lays out a coarse stage: B rows
                  of `--per_row` samples of L / per_row tokens; per-token modulation, attention
                  within each sample)
                  vs torch's block on the same samples unpacked, B * per_row rows of L / per_row
                  tokens (no padding: the same useful work).
Forward only (sampling), float32 by default, SiT/PPF-S width at a CFG-doubled batch of 16 and
the 2x2 stage's 256 tokens. Torch is optional (the benchmark exits with a message without it).

  python -m ppflow_jax.bench.block --json=docs/block_cpu.json --markdown
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from ppflow_jax.bench import common
from ppflow_jax.models import dit


def _copy_linear(dst: nnx.Linear, src) -> None:
  """A torch nn.Linear's weight (out, in) and bias into an nnx.Linear (kernel (in, out))."""
  dst.kernel.value = jnp.asarray(src.weight.detach().numpy().T)
  dst.bias.value = jnp.asarray(src.bias.detach().numpy())


def _modules(d: int, heads: int, dtype):
  """(torch Block, project DiTBlock) with the same weights."""
  import torch  # pylint: disable=import-outside-toplevel
  from third_party.torch_ref import model as torch_ref  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  ref = torch_ref.Block(d, heads, 4.0).eval()
  for p in ref.adaLN_modulation.parameters():  # adaLN-Zero starts at 0: make the gates matter
    torch.nn.init.normal_(p, std=0.02)
  ours = dit.DiTBlock(d, heads, 4.0, impl='xla', dtype=dtype, param_dtype=jnp.float32,
                      rngs=nnx.Rngs(0))
  for dst, src in ((ours.attn.qkv, ref.attn.qkv), (ours.attn.proj, ref.attn.proj),
                   (ours.mlp.fc1, ref.mlp.fc1), (ours.mlp.fc2, ref.mlp.fc2),
                   (ours.adaLN_modulation, ref.adaLN_modulation[1])):
    _copy_linear(dst, src)
  return ref, ours


def _jitted(module: nnx.Module, fn):
  """jit(fn(module, *args)) with the module's state as an argument (the project's pattern)."""
  graphdef, state = nnx.split(module)
  compiled = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
  return lambda *args: jax.block_until_ready(compiled(state, *args))


def parts(opts: dict) -> dict[str, tuple]:
  """name -> (jax run, torch run, jax output, torch output) for every part, outputs as numpy."""
  import torch  # pylint: disable=import-outside-toplevel
  from third_party.torch_ref import model as torch_ref  # pylint: disable=import-outside-toplevel
  b, length, d, heads, per_row = (opts[k] for k in ('batch', 'length', 'width', 'heads',
                                                    'per_row'))
  ref, ours = _modules(d, heads, jnp.dtype(opts['dtype']))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, length, d), np.float32)
  c = rng.standard_normal((b, d), np.float32)
  shift, scale = (rng.standard_normal((b, 1, d), np.float32) for _ in range(2))
  hidden = rng.standard_normal((b, length, 4 * d), np.float32)
  # The rows a PackPlan gives a coarse stage: `per_row` samples of length / per_row tokens each.
  seg = np.repeat(np.arange(1, per_row + 1, dtype=np.int32), length // per_row)
  layout = dit.TokenLayout(jnp.asarray(np.broadcast_to(seg, (b, length))),
                           ((b, per_row, length // per_row, b * per_row),))
  c_packed = rng.standard_normal((b * per_row, d), np.float32)
  t = lambda a: torch.from_numpy(a)
  torch_norm = torch_ref._norm  # pylint: disable=protected-access

  def torch_run(fn, *args):
    def run():
      with torch.no_grad():
        return fn(*args)
    return run

  mod_ours = lambda m, c: dit.per_token(m.adaLN_modulation(nnx.silu(c)), None)
  jax_runs = {
      'norm_modulate': (jax.jit(lambda x, s, g: dit.modulate(dit.layer_norm(x), s, g)),
                        (x, shift, scale)),
      'gelu': (jax.jit(lambda h: jax.nn.gelu(h, approximate=True)), (hidden,)),
      'mlp': (_jitted(ours.mlp, lambda m, x: m(x)), (x,)),
      'attention': (_jitted(ours.attn, lambda m, x: m(x, None)), (x,)),
      'modulation': (_jitted(ours, mod_ours), (c,)),
      'block': (_jitted(ours, lambda m, x, c: m(x, c, None)), (x, c)),
      'block_packed': (_jitted(ours, lambda m, x, c: m(x, c, layout)), (x, c_packed)),
  }
  torch_runs = {
      'norm_modulate': (lambda x, s, g: torch_norm(x) * (1 + g) + s, (t(x), t(shift), t(scale))),
      'gelu': (lambda h: torch.nn.functional.gelu(h, approximate='tanh'), (t(hidden),)),
      'mlp': (ref.mlp, (t(x),)),
      'attention': (ref.attn, (t(x),)),
      'modulation': (lambda c: ref.adaLN_modulation(c)[:, None], (t(c),)),
      'block': (ref, (t(x), t(c))),
      'block_packed': (ref, (t(x.reshape(b * per_row, length // per_row, d)), t(c_packed))),
  }
  out = {}
  for name, (fn, args) in jax_runs.items():
    jax_run = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
    tfn, targs = torch_runs[name]
    out[name] = (jax_run, torch_run(tfn, *targs), np.asarray(jax_run()),
                 torch_run(tfn, *targs)().numpy())
  out['block_packed'] = out['block_packed'][:3] + (
      out['block_packed'][3].reshape(b, length, d),)
  return out


def run(opts: dict) -> list[dict]:
  """Checks every part equal on both sides, then times them in interleaved rounds."""
  runs = {}
  for name, (jax_run, torch_run, jax_out, torch_out) in parts(opts).items():
    np.testing.assert_allclose(jax_out.reshape(torch_out.shape), torch_out, atol=2e-4, rtol=2e-3,
                               err_msg=f'part {name}: JAX and torch disagree')
    runs[(name, 'jax')], runs[(name, 'torch')] = jax_run, torch_run

  def timed(fn):
    def call():
      start = time.perf_counter()
      for _ in range(opts['calls']):
        fn()
      return 1e3 * (time.perf_counter() - start) / opts['calls']
    return call
  times = common.interleaved({key: timed(fn) for key, fn in runs.items()}, opts['rounds'])
  names = list(dict.fromkeys(name for name, _ in runs))
  return [dict(part=name, jax_ms=common.spread(times[(name, 'jax')]),
               torch_ms=common.spread(times[(name, 'torch')]),
               jax_over_torch=common.round_ratios(times[(name, 'jax')], times[(name, 'torch')]))
          for name in names]


def table(result: dict) -> tuple[list[str], list[list[str]]]:
  headers = ['part', 'JAX ms', 'torch ms', 'JAX / torch time (IQR)']
  ms = lambda s: f"{s['median']:.1f} ({s['min']:.0f}-{s['max']:.0f})"
  rows = [[r['part'], ms(r['jax_ms']), ms(r['torch_ms']),
           f"{r['jax_over_torch']['median']:.2f} ({r['jax_over_torch']['q1']:.2f}-"
           f"{r['jax_over_torch']['q3']:.2f})"] for r in result['results']]
  return headers, rows


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    print('bench.block: torch is not installed (pip install ".[torch]"); nothing to compare.')
    return
  f = flags.FLAGS
  if f.length % f.per_row:
    raise app.UsageError(f'--length={f.length} must divide by --per_row={f.per_row}')
  opts = dict(batch=f.batch, length=f.length, width=f.width, heads=f.heads, per_row=f.per_row,
              dtype=f.dtype, rounds=f.rounds, calls=f.calls)
  common.report('block', opts, run(opts), table,
                f'torch {torch.__version__}, x ({f.batch}, {f.length}, {f.width}), {f.heads} '
                f'heads, {f.dtype}; {f.rounds} interleaved rounds of {f.calls} calls; median '
                '(min-max) ms per call')


if __name__ == '__main__':
  common.define_part_flags(rounds=7, calls=3)  # one sample = the mean of `calls` calls
  flags.DEFINE_integer('length', 256, 'Tokens per row (the 2x2 stage of a 32x32 latent).')
  flags.DEFINE_integer('width', 384, 'Hidden size (S: 384).')
  flags.DEFINE_integer('per_row', 4, 'Samples per packed row in block_packed (4x4 stage: 4).')
  app.run(main)
