"""Statistics read from a compiled program's HLO text: collectives, matmul FLOPs, Mosaic kernels.

`compiled.as_text()` of an SPMD program is the per-device program, so every count here is per
chip. Collectives inside `while` bodies (scanned blocks, sampler loops, the TPU compiler's own
collective-matmul loops) run once per iteration: each computation is weighted by how often it
runs per call of the entry computation, the trip count of a loop being read from its counter
(start in the initial loop state, `compare(i, constant(N)), direction=LT` in the condition, the
step of `i + constant` in the body), as XLA emits for scans, fori_loops and the TPU compiler's
collective-matmul loops; a loop whose trip count cannot be read counts once and is reported in
`unknown_trip_counts`.

Bytes of a collective are the bytes of its result (the gathered / reduced / permuted buffer);
async pairs are counted at their `-done` op, so nothing is counted twice. Matmul FLOPs are those of
the `dot` and `convolution` ops (the TPU compiler emits matmuls as 1x1 convolutions), 2 per
multiply-add, loops counted like collectives; Mosaic kernels are opaque, so their FLOPs are not in
it (XLA's own cost analysis counts a loop body once, this count does not).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute', 'all-to-all')
MOSAIC_TARGET = 'tpu_custom_call'
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2,
                'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
                'c64': 8, 'c128': 16}
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$')
_ARRAY = re.compile(r'\b([a-z]+\d*(?:e\d+m\d+fn)?)\[([\d,]*)\]')
_CALLEE = re.compile(r'\b(?:body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')


@dataclasses.dataclass
class Stats:
  """Per-chip counts of one program (per execution, loops unrolled by their trip counts)."""
  collectives: dict[str, dict[str, float]]   # kind -> {'count': n, 'bytes': b}
  mosaic_kernels: int                        # distinct tpu_custom_call ops in the program text
  mosaic_calls: int                          # ... times executed per call (loops counted)
  unknown_trip_counts: int
  matmul_flops: float = 0.0                  # dot + convolution ops (loops counted)


def _ints(dims: str) -> list[int]:
  """'16,256' -> [16, 256] ('' -> [], a scalar)."""
  return [int(d) for d in filter(None, dims.split(','))]


def _dims(array_type: str) -> list[int]:
  """'bf16[16,256]{1,0}' -> [16, 256] (the first array in the type)."""
  return _ints(_ARRAY.search(array_type).group(2))


def _result_bytes(result_type: str) -> int:
  return sum(math.prod(_ints(dims)) * _DTYPE_BYTES.get(dtype, 4)
             for dtype, dims in _ARRAY.findall(result_type))


def _matmul_flops(op: str, result_type: str, args: str, defs: dict) -> float:
  """2 x output elements x contracted elements of one dot / convolution instruction."""
  operands = _operands(args)
  if op == 'dot':
    lhs = _dims(defs[operands[0]][0])
    contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', args)
    axes = _ints(contracting.group(1)) if contracting else []
    return 2.0 * math.prod(_dims(result_type)) * math.prod(lhs[a] for a in axes)
  # convolution: batch x output features x input features (per group) x the (output, window)
  # position pairs that read the input rather than its padding, per spatial dim.
  lhs_labels, rhs_labels, out_labels = re.search(
      r'dim_labels=(\w+)_(\w+)->(\w+)', args).groups()
  lhs = dict(zip(lhs_labels, _dims(defs[operands[0]][0])))
  rhs = dict(zip(rhs_labels, _dims(defs[operands[1]][0])))
  dims = dict(zip(out_labels, _dims(result_type)))
  window = _window(args, sum(l.isdigit() for l in out_labels))
  pairs = math.prod(_valid_pairs(lhs[k], dims[k], *window[int(k)])
                    for k in out_labels if k.isdigit())
  return 2.0 * dims['b'] * dims['f'] * rhs['i'] * pairs


def _window(args: str, rank: int) -> list[tuple[int, int, int, int, int]]:
  """Per spatial dim of a convolution: (size, pad_low, stride, lhs_dilate, rhs_dilate)."""
  text = re.search(r'window=\{([^}]*)\}', args)
  fields = dict(f.split('=') for f in text.group(1).split()) if text else {}
  get = lambda key, default: ([int(v) for v in fields[key].split('x')] if key in fields
                              else [default] * rank)
  pads = ([int(p.split('_')[0]) for p in fields['pad'].split('x')] if 'pad' in fields
          else [0] * rank)
  return list(zip(get('size', 1), pads, get('stride', 1), get('lhs_dilate', 1),
                  get('rhs_dilate', 1)))


def _valid_pairs(size_in: int, size_out: int, window: int, pad_low: int, stride: int,
                 lhs_dilate: int, rhs_dilate: int) -> int:
  """(output position, window position) pairs that land on an input element, not padding."""
  span = (size_in - 1) * lhs_dilate + 1
  count = 0
  for w in range(window):
    offset = w * rhs_dilate - pad_low   # input index = o * stride + offset
    count += sum(1 for o in range(size_out)
                 if 0 <= o * stride + offset < span and (o * stride + offset) % lhs_dilate == 0)
  return count


def analyze(hlo_text: str) -> Stats:
  """Collectives, matmul FLOPs and Mosaic kernels of compiled (post-optimisation) HLO text."""
  bodies: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(1)
      bodies[current] = []
      if line.startswith('ENTRY'):
        entry = current
    elif line.rstrip() == '}':
      current = None
    elif current is not None:
      bodies[current].append(line)
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  # Each instruction parsed once: (name, result type, op, operand text) per computation, and by
  # name (unique in a module) for the operands of dots, convolutions and loop counters.
  parsed = {name: [(m.groups(), line) for line in lines if (m := _INSTRUCTION.match(line))]
            for name, lines in bodies.items()}
  defs = {inst[0]: inst[1:] for rows in parsed.values() for inst, _ in rows}

  unknown = 0

  def times(line: str) -> int:
    nonlocal unknown
    if ' while(' not in line:
      return 1
    n = _trip_count(line, bodies, defs)
    if n is None:
      unknown += 1
      return 1
    return n

  # How often each computation runs per entry call; HLO call graphs are acyclic.
  weight: dict[str, float] = collections.defaultdict(float)
  order, seen = [], set()

  def visit(name: str) -> None:  # reverse post-order = callers before callees
    if name in seen or name not in bodies:
      return
    seen.add(name)
    for line in bodies[name]:
      for callee in _callees(line):
        visit(callee)
    order.append(name)
  visit(entry)
  weight[entry] = 1.0
  for name in reversed(order):
    for line in bodies[name]:
      callees = _callees(line)
      n = times(line) if callees else 1
      for callee in callees:
        weight[callee] += weight[name] * (n if re.search(rf'body=%?{re.escape(callee)}\b', line)
                                          else 1)

  collectives = {k: {'count': 0.0, 'bytes': 0.0} for k in COLLECTIVES}
  kernels, kernel_calls, matmul_flops = 0, 0.0, 0.0
  for name in order:
    for (_, result_type, op, args), line in parsed[name]:
      if op in ('dot', 'convolution'):
        matmul_flops += weight[name] * _matmul_flops(op, result_type, args, defs)
      if op == 'custom-call' and f'custom_call_target="{MOSAIC_TARGET}"' in line:
        kernels += 1
        kernel_calls += weight[name]
      kind = op[:-len('-done')] if op.endswith('-done') else op
      if kind in collectives and not op.endswith('-start'):
        collectives[kind]['count'] += weight[name]
        collectives[kind]['bytes'] += weight[name] * _result_bytes(result_type)
  return Stats({k: v for k, v in collectives.items() if v['count']}, kernels, int(kernel_calls),
               unknown, matmul_flops)


def _operands(args: str) -> list[str]:
  return re.findall(r'%([\w.\-]+)', args.split(')')[0])


def _root(lines: list[str]) -> re.Match | None:
  """The parsed ROOT instruction of a computation."""
  return _INSTRUCTION.match(next((l for l in lines if l.lstrip().startswith('ROOT')), ''))


def _definition(name: str, defs: dict) -> tuple | None:
  """The instruction that defines `name`, looking through copies."""
  d = defs.get(name)
  while d and d[1] == 'copy':
    d = defs.get(_operands(d[2])[0])
  return d


def _constant(name: str, defs: dict) -> int | None:
  """The integer value of a scalar constant, else None."""
  d = _definition(name, defs)
  m = d and d[1] == 'constant' and re.match(r'(-?\d+)\)', d[2])
  return int(m.group(1)) if m else None


def _tuple_index(name: str, defs: dict) -> int | None:
  """k if `name` is element k of a tuple (the loop state), else None."""
  d = _definition(name, defs)
  m = d and d[1] == 'get-tuple-element' and re.search(r'index=(\d+)', d[2])
  return int(m.group(1)) if m else None


def _trip_count(line: str, bodies: dict, defs: dict) -> int | None:
  """Iterations of a `while` whose loop state holds a counter i: start, i < N, i += step.

  XLA's scans and fori_loops count from 0 in steps of 1; the TPU compiler's collective-matmul
  loops may step by 2 (two windows per iteration), so start, bound and step are all read.
  """
  cond = re.search(r'condition=%?([\w.\-]+)', line)
  body = re.search(r'body=%?([\w.\-]+)', line)
  if not (cond and body and cond.group(1) in bodies and body.group(1) in bodies):
    return None
  compare = _root(bodies[cond.group(1)])
  if not (compare and compare.group(3) == 'compare' and 'direction=LT' in compare.group(4)):
    return None
  counter, bound = _operands(compare.group(4))[:2]
  index, stop = _tuple_index(counter, defs), _constant(bound, defs)
  body_root = _root(bodies[body.group(1)])
  init = defs.get(_operands(line.split(' while(')[1])[0])
  if index is None or stop is None or not body_root or not init or init[1] != 'tuple':
    return None
  update = (_definition(_operands(body_root.group(4))[index], defs)
            if body_root.group(3) == 'tuple' else None)
  start = _constant(_operands(init[2])[index], defs)
  if not update or update[1] != 'add' or start is None:
    return None
  a, b = _operands(update[2])[:2]
  step = _constant(b, defs) if _tuple_index(a, defs) == index else _constant(a, defs)
  if not step or step <= 0:
    return None
  return max(0, -(-(stop - start) // step))


def _callees(line: str) -> list[str]:
  names = _CALLEE.findall(line)
  for group in _BRANCHES.findall(line):
    names += [n.strip().lstrip('%') for n in group.split(',') if n.strip()]
  return names
