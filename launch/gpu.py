"""GPU launcher: `ppflow_jax.main` with one process per machine that sees all of its GPUs, on one
host, on several hosts over ssh, or under SLURM (docs/launch.md walks through it).

  # one host, all its GPUs
  python launch/gpu.py --config=configs/ppf_xl_2.py --workdir=/ckpt/ppf_xl_2
  # several hosts over ssh: process i on the i-th host, coordinator on the first
  python launch/gpu.py --hosts=gpu0,gpu1 --config=configs/ppf_xl_2.py --workdir=/nfs/ckpt/ppf
  # under SLURM (inside sbatch/salloc): one task per node
  python launch/gpu.py --slurm --num_processes=4 --config=... --workdir=/shared/ppf
  # any other way: print the N per-node commands, or run only --process_id=i here
  python launch/gpu.py --num_processes=2 --coordinator_address=gpu0:12345 --config=... --workdir=...

It sets XLA_FLAGS to the recommended GPU flags and XLA_PYTHON_CLIENT_MEM_FRACTION (defaults below,
reasons in docs/launch.md).
Every invocation checks its inputs and prints the exact commands; `--dry_run` stops there.
Flags after `--` go to ppflow_jax.main unchanged.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys

import common
from common import Command, LaunchError

# The latency-hiding scheduler overlaps collectives (gradient all-reduce, FSDP all-gathers) with
# compute; it is the flag NVIDIA's JAX containers set by default. Unknown flags abort XLA, so the
# default stays minimal and long-lived.
RECOMMENDED_XLA_FLAGS = '--xla_gpu_enable_latency_hiding_scheduler=true'
# JAX preallocates 75% of GPU memory by default; training and sampling own the GPU, so give XLA 90%
# and leave the rest to cuDNN/cuBLAS workspaces and NCCL.
DEFAULT_MEM_FRACTION = 0.9
_HOST = re.compile(r'^([A-Za-z0-9_.@-]+|\[[0-9a-fA-F:]+\])$')
_SLURM_FIRST_NODE = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)'


def _check_coordinator(address: str) -> None:
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise LaunchError(f'--coordinator_address={address!r}: expected HOST:PORT, e.g. gpu0:12345')


def _parse_hosts(hosts: str) -> list[str]:
  names = [h.strip() for h in hosts.split(',') if h.strip()]
  for h in names:
    if not _HOST.match(h):
      raise LaunchError(f'--hosts: {h!r} is not a host name ([user@]name or [ipv6])')
  duplicates = sorted({h for h in names if names.count(h) > 1})
  if duplicates:
    raise LaunchError(f'--hosts lists {duplicates} more than once; gpu.py runs one process per '
                      'host and that process uses all of its GPUs')
  return names


def _environment(args: argparse.Namespace) -> dict[str, str]:
  if not 0.0 < args.mem_fraction <= 1.0:
    raise LaunchError(f'--mem_fraction={args.mem_fraction} must be in (0, 1]')
  env = {'XLA_PYTHON_CLIENT_MEM_FRACTION': f'{args.mem_fraction:g}'}
  if args.xla_flags:
    env['XLA_FLAGS'] = args.xla_flags
  if args.gpus:
    if not re.fullmatch(r'\d+(,\d+)*', args.gpus):
      raise LaunchError(f'--gpus={args.gpus!r}: expected GPU indices such as 0,1,2,3')
    env['CUDA_VISIBLE_DEVICES'] = args.gpus
  env.update(common.parse_env(args.env))
  return env


def _distributed(coordinator: str, n: int, i: int) -> list[str]:
  """main's flags for `jax.distributed.initialize`; none for a single process."""
  if n == 1:
    return []
  return [f'--coordinator_address={coordinator}', f'--num_processes={n}', f'--process_id={i}']


def build(args: argparse.Namespace, main_args: list[str]) -> tuple[list[Command], bool, str]:
  """The commands to run, whether they run in parallel, and the tool they need (or '')."""
  if args.hosts and args.slurm:
    raise LaunchError('--hosts and --slurm exclude each other: SLURM picks the nodes itself')
  hosts = _parse_hosts(args.hosts) if args.hosts else []
  n = len(hosts) if hosts else args.num_processes
  if n < 1:
    raise LaunchError(f'--num_processes={n} must be at least 1')
  if hosts and args.num_processes not in (1, n):
    raise LaunchError(f'--num_processes={args.num_processes} but --hosts names {n} hosts; they '
                      'must match (one process per host), or leave --num_processes out')
  if not 0 < args.port < 65536:
    raise LaunchError(f'--port={args.port} is not a TCP port')
  if args.coordinator_address:
    _check_coordinator(args.coordinator_address)
  manual = n > 1 and not hosts and not args.slurm
  if args.process_id is not None:
    if not manual:
      raise LaunchError('--process_id is only for --num_processes=N > 1 without --hosts/--slurm '
                        '(those number the processes themselves)')
    if not 0 <= args.process_id < n:
      raise LaunchError(f'--process_id={args.process_id} must be in [0, {n - 1}]')
  if manual and not args.coordinator_address:
    raise LaunchError(f'--num_processes={n} without --hosts or --slurm needs '
                      '--coordinator_address=HOST:PORT (the host of process 0)')
  if manual and args.process_id is None and not args.dry_run:
    raise LaunchError(f'--num_processes={n} without --hosts/--slurm only prints the per-node '
                      'commands: add --dry_run, or --process_id=i to start process i here')
  remote = n > 1 or bool(hosts)
  config = common.resolve_config(args.config, remote=remote)
  workdir = common.check_workdir(args.workdir, multi_host=n > 1,
                                 why=f'{n} processes on {n} hosts share it')
  env = _environment(args)
  # ssh and srun commands start a login shell's python3; the others start where gpu.py runs.
  python = args.python or ('python3' if hosts or args.slurm else sys.executable)
  base = [*common.env_argv(env), *common.main_argv(python, config, workdir, args.mode, main_args)]
  remote_dir = args.remote_dir or str(common.REPO_ROOT)
  cd = f'cd {shlex.quote(remote_dir)} && '
  for name, value in env.items():
    common.say(f'{name}={value}')
  if n > 1 and not common.is_gcs(workdir):  # a bucket URL is shared by every host already
    common.say(f'workdir {workdir} must be one shared file system (NFS, Filestore, a gcsfuse '
               f'mount), readable and writable at that path by all {n} hosts')

  if args.slurm:
    common.say(f'srun: {n} node(s), one task each; coordinator = first node of the allocation, '
               f'port {args.port}; run inside sbatch/salloc')
    coordinator = args.coordinator_address or f'{_SLURM_FIRST_NODE}:{args.port}'
    # Expanded by bash on each node, so these stay unquoted.
    dist = (f'--coordinator_address="{coordinator}" --num_processes="$SLURM_NTASKS" '
            '--process_id="$SLURM_PROCID"') if n > 1 else ''
    script = f'{cd}{shlex.join(base)} {dist}'.rstrip()
    argv = ('srun', f'--nodes={n}', '--ntasks-per-node=1', 'bash', '-c', script)
    return [Command(argv)], False, 'srun'

  if hosts:
    coordinator = args.coordinator_address or f'{hosts[0].split("@")[-1]}:{args.port}'
    common.say(f'{n} host(s) over ssh, process i on host i, coordinator {coordinator}')
    commands = [Command(('ssh', '-o', 'BatchMode=yes', host,
                         cd + shlex.join(base + _distributed(coordinator, n, i))))
                for i, host in enumerate(hosts)]
    return commands, True, 'ssh'

  if manual:
    coordinator = args.coordinator_address
    ids = range(n) if args.process_id is None else [args.process_id]
    common.say(f'{n} processes, coordinator {coordinator}: run command i on node i (or '
               'gpu.py ... --process_id=i there); all nodes need the repository at the same path')
    return [Command(tuple(base + _distributed(coordinator, n, i)), cwd=remote_dir)
            for i in ids], False, ''

  common.say('one process on this host, using all GPUs it can see')
  return [Command(tuple(base), cwd=str(common.REPO_ROOT))], False, ''


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='gpu.py', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', required=True, help='config file, e.g. configs/ppf_xl_2.py[:arg]')
  p.add_argument('--workdir', required=True,
                 help='checkpoints and samples (a file system path; for several hosts an '
                 'absolute path on a shared file system: NFS, Filestore, a gcsfuse mount)')
  p.add_argument('--mode', default='train', choices=common.MODES)
  p.add_argument('--python', default='',
                 help='interpreter (default: this one locally, python3 on other hosts)')
  p.add_argument('--gpus', default='', help='CUDA_VISIBLE_DEVICES for every process (default: all)')
  p.add_argument('--mem_fraction', type=float, default=DEFAULT_MEM_FRACTION,
                 help='XLA_PYTHON_CLIENT_MEM_FRACTION: share of GPU memory XLA preallocates')
  p.add_argument('--xla_flags', default=RECOMMENDED_XLA_FLAGS,
                 help='XLA_FLAGS for every process (replaces the default; "" sets none)')
  p.add_argument('--env', action='append', default=[], metavar='NAME=VALUE',
                 help='extra environment variable (repeatable)')
  p.add_argument('--hosts', default='', help='comma-separated hosts to launch on over ssh')
  p.add_argument('--slurm', action='store_true', help='launch with srun, one task per node')
  p.add_argument('--num_processes', type=int, default=1,
                 help='processes (= hosts); implied by --hosts')
  p.add_argument('--process_id', type=int, default=None,
                 help='with --num_processes and no --hosts/--slurm: run only this process here')
  p.add_argument('--coordinator_address', default='',
                 help='HOST:PORT of process 0 (default: first host / first SLURM node)')
  p.add_argument('--port', type=int, default=12345, help='coordinator port when it is derived')
  p.add_argument('--remote_dir', default='',
                 help=f'the repository on the other hosts (default: {common.REPO_ROOT})')
  p.add_argument('--dry_run', action='store_true', help='only print the commands')
  return p


def main(argv: list[str]) -> int:
  argv, main_args = common.split_passthrough(argv)
  args = _parser().parse_args(argv)
  commands, parallel, tool = build(args, common.check_main_args(main_args))
  if tool and not args.dry_run:
    common.require_tool(tool, {'ssh': 'install an OpenSSH client with key access to every host',
                               'srun': 'run inside a SLURM allocation (sbatch or salloc)'}[tool])
  return common.execute(commands, args.dry_run, parallel=parallel)


if __name__ == '__main__':
  common.cli(main)
