"""Statistics read from a compiled program's HLO text: collectives, matmul FLOPs, Mosaic kernels.

`compiled.as_text()` of an SPMD program is the per-device program, so every count here is per
chip. Collectives inside `while` bodies (scanned blocks, sampler loops, the TPU compiler's own
collective-matmul loops) run once per iteration: each computation is weighted by how often it
runs per call of the entry computation, the trip count of a loop being read from its condition
(`compare(i, constant(N)), direction=LT`, as XLA emits for scans and fori_loops; a loop whose
trip count cannot be read counts once and is reported in `unknown_trip_counts`).

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
_TRIP_CONSTANT = re.compile(r'= s32\[\]\S* constant\((\d+)\)')


@dataclasses.dataclass
class Stats:
  """Per-chip counts of one program (per execution, loops unrolled by their trip counts)."""
  collectives: dict[str, dict[str, float]]   # kind -> {'count': n, 'bytes': b}
  mosaic_kernels: int                        # distinct tpu_custom_call ops in the program text
  mosaic_calls: int                          # ... times executed per call (loops counted)
  unknown_trip_counts: int
  matmul_flops: float = 0.0                  # dot + convolution ops (loops counted)


def _dims(array_type: str) -> list[int]:
  """'bf16[16,256]{1,0}' -> [16, 256] (the first array in the type)."""
  return [int(d) for d in filter(None, _ARRAY.search(array_type).group(2).split(','))]


def _result_bytes(result_type: str) -> int:
  return sum(math.prod(int(d) for d in filter(None, dims.split(','))) * _DTYPE_BYTES.get(dtype, 4)
             for dtype, dims in _ARRAY.findall(result_type))


def _matmul_flops(op: str, result_type: str, args: str, types: dict[str, str]) -> float:
  """2 x output elements x contracted elements of one dot / convolution instruction."""
  operands = re.findall(r'%([\w.\-]+)', args.split(')')[0])
  out = math.prod(_dims(result_type))
  if op == 'dot':
    lhs = _dims(types[operands[0]])
    contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', args)
    axes = [int(a) for a in filter(None, contracting.group(1).split(','))] if contracting else []
    return 2.0 * out * math.prod(lhs[a] for a in axes)
  # convolution: the kernel's input-feature and spatial dims are contracted (dim_labels rhs part).
  rhs = _dims(types[operands[1]])
  labels = re.search(r'dim_labels=\w+_(\w+)->', args).group(1)
  return 2.0 * out * math.prod(n for n, l in zip(rhs, labels) if l != 'o')


def analyze(hlo_text: str) -> Stats:
  """Collectives and Mosaic kernels of compiled (post-optimisation) HLO text."""
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

  unknown = 0

  def trip_count(condition: str) -> int:
    nonlocal unknown
    consts = [int(c) for line in bodies.get(condition, []) for c in _TRIP_CONSTANT.findall(line)]
    if len(consts) == 1 and any('direction=LT' in l for l in bodies[condition]):
      return consts[0]
    unknown += 1
    return 1

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
      times = 1
      if ' while(' in line:
        cond = re.search(r'condition=%?([\w.\-]+)', line)
        times = trip_count(cond.group(1)) if cond else 1
      for callee in _callees(line):
        weight[callee] += weight[name] * (times if f'body=%{callee}' in line
                                          or f'body={callee}' in line else 1)

  instructions = {name: [(m.groups(), line) for line in bodies[name]
                         if (m := _INSTRUCTION.match(line))] for name in order}
  types = {inst: result_type
           for rows in instructions.values() for (inst, result_type, _, _), _ in rows}
  collectives = {k: {'count': 0.0, 'bytes': 0.0} for k in COLLECTIVES}
  kernels, kernel_calls, matmul_flops = 0, 0.0, 0.0
  for name in order:
    for (_, result_type, op, args), line in instructions[name]:
      if op in ('dot', 'convolution'):
        matmul_flops += weight[name] * _matmul_flops(op, result_type, args, types)
      if op == 'custom-call' and f'custom_call_target="{MOSAIC_TARGET}"' in line:
        kernels += 1
        kernel_calls += weight[name]
      kind = op[:-len('-done')] if op.endswith('-done') else op
      if kind in collectives and not op.endswith('-start'):
        collectives[kind]['count'] += weight[name]
        collectives[kind]['bytes'] += weight[name] * _result_bytes(result_type)
  return Stats({k: v for k, v in collectives.items() if v['count']}, kernels, int(kernel_calls),
               unknown, matmul_flops)


def _callees(line: str) -> list[str]:
  names = _CALLEE.findall(line)
  for group in _BRANCHES.findall(line):
    names += [n.strip().lstrip('%') for n in group.split(',') if n.strip()]
  return names
