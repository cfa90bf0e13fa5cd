"""Cloud TPU VM launcher: create a slice, copy and install the code on every worker, run
`ppflow_jax.main` on every worker at once, delete the slice (docs/launch.md walks through it).

  python launch/tpu_vm.py create --name=ppf --zone=us-east5-a --accelerator_type=v5p-64 [--spot]
  python launch/tpu_vm.py setup  --name=ppf --zone=us-east5-a [--repo_url=https://...]
      [--gcs_bucket=my-bucket]
  python launch/tpu_vm.py run    --name=ppf --zone=us-east5-a --accelerator_type=v5p-64
      --config=configs/ppf_xl_2.py --workdir=/gcs/my-bucket/ppf_xl_2 -- --config.train.steps=1000
  python launch/tpu_vm.py delete --name=ppf --zone=us-east5-a

Every subcommand checks its inputs, says what it will do and prints the exact gcloud commands;
`--dry_run` stops there (no gcloud needed). On a multi-host slice every worker runs the same program
and `ppflow_jax.main` calls `jax.distributed.initialize()`, which finds the other workers itself.
A multi-host workdir must be shared by all workers: a gs:// URL (main reads and writes it natively)
or a path under a bucket that `setup --gcs_bucket` mounts with gcsfuse on every worker.
"""

from __future__ import annotations

import argparse
import re
import shlex
import tempfile

import common
from common import Command, LaunchError

# Accelerator family -> (default runtime image, what the number in `v5p-64` counts, that many per
# worker VM). v2-v5p count TensorCores (8 per VM: 4 chips x 2 cores, or 4 x 2 on v2/v3); v5e and
# v6e count chips: 1-, 4- and 8-chip slices are one VM, larger ones are 4 chips per VM.
_FAMILIES = {
    'v2': ('tpu-ubuntu2204-base', 'cores', 8),
    'v3': ('tpu-ubuntu2204-base', 'cores', 8),
    'v4': ('tpu-ubuntu2204-base', 'cores', 8),
    'v5p': ('v2-alpha-tpuv5', 'cores', 8),
    'v5litepod': ('v2-alpha-tpuv5-lite', 'chips', 4),
    'v6e': ('v2-alpha-tpuv6e', 'chips', 4),
}
_CHIP_SLICES = (1, 4, 8, 16, 32, 64, 128, 256)
_NAME = re.compile(r'^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$')
_ZONE = re.compile(r'^[a-z]+-[a-z]+[0-9]+-[a-z]$')
_REPO_DIR = 'ppflow_jax'            # the checkout on every worker, in the login user's home.
_VENV_PYTHON = '.venv/bin/python'   # inside _REPO_DIR (created by `setup`).
_BUNDLE = 'ppflow_jax_bundle.tgz'
_BUNDLED = ('ppflow_jax', 'configs', 'third_party', 'requirements.txt')
_LOG = 'ppflow_run.log'
# Cloud Storage FUSE from Google's apt repository (the commands of its install guide); the
# signed-by keyring keeps that key limited to this one repository.
_GCSFUSE_INSTALL = (
    'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
    'https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" | '
    'sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null && '
    'curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | '
    'sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null && '
    'sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse')


def num_workers(accelerator_type: str) -> int:
  """Worker VMs of a slice, e.g. 'v5p-64' -> 8, 'v6e-16' -> 4, 'v4-8' -> 1; checks the name."""
  m = re.fullmatch(r'([a-z0-9]+)-([0-9]+)', accelerator_type)
  family = m and m.group(1)
  if family not in _FAMILIES:
    raise LaunchError(f'--accelerator_type={accelerator_type!r}: expected FAMILY-SIZE with FAMILY '
                      f'one of {sorted(_FAMILIES)}, e.g. v5p-64, v4-32, v5litepod-16, v6e-8')
  size = int(m.group(2))
  _, unit, per_vm = _FAMILIES[family]
  if unit == 'cores':
    if size < 8 or size % 8:
      raise LaunchError(f'--accelerator_type={accelerator_type!r}: {family} sizes count '
                        'TensorCores and are multiples of 8 (v4-8, v4-32, v5p-64, ...)')
    return size // per_vm
  if size not in _CHIP_SLICES:
    raise LaunchError(f'--accelerator_type={accelerator_type!r}: {family} sizes count chips and '
                      f'are one of {list(_CHIP_SLICES)}')
  return 1 if size <= 8 else size // per_vm


def _check_target(args: argparse.Namespace) -> None:
  if not _NAME.match(args.name):
    raise LaunchError(f'--name={args.name!r}: TPU names are 1-63 lower case letters, digits and '
                      'hyphens, starting with a letter and not ending with a hyphen')
  if not _ZONE.match(args.zone):
    raise LaunchError(f'--zone={args.zone!r} is not a zone name such as us-central2-b or '
                      'europe-west4-a (a region like us-central2 needs its -a/-b/... suffix)')


def _gcloud(args: argparse.Namespace, *words: str, operands: tuple[str, ...] = ()) -> list[str]:
  """`gcloud compute tpus <words> NAME|operands --zone=Z [--project=P]`."""
  argv = ['gcloud', 'compute', 'tpus', *words, *(operands or (args.name,)), f'--zone={args.zone}']
  return argv + ([f'--project={args.project}'] if args.project else [])


def _ssh_all(args: argparse.Namespace, remote: str) -> Command:
  return Command((*_gcloud(args, 'tpu-vm', 'ssh'), '--worker=all', f'--command={remote}'))


def _jax_pin() -> str:
  """The `jax==X` pin of requirements.txt, so jax[tpu] brings the matching libtpu."""
  reqs = (common.REPO_ROOT / 'requirements.txt').read_text()
  m = re.search(r'^jax==(\S+)', reqs, flags=re.M)
  return f'jax[tpu]=={m.group(1)}' if m else 'jax[tpu]'


def create(args: argparse.Namespace) -> list[Command]:
  workers = num_workers(args.accelerator_type)
  version = args.version or _FAMILIES[args.accelerator_type.split('-')[0]][0]
  kind = 'spot ' if args.spot else ''
  if args.queued:
    common.say(f'request a queued {kind}{args.accelerator_type} slice {args.name!r} '
               f'({workers} worker VMs) in {args.zone}, runtime {version}')
    argv = [*_gcloud(args, 'queued-resources', 'create'), f'--node-id={args.name}',
            f'--accelerator-type={args.accelerator_type}', f'--runtime-version={version}']
    common.say('it is ready when `gcloud compute tpus queued-resources describe '
               f'{args.name} --zone={args.zone}` shows state ACTIVE')
  else:
    common.say(f'create {kind}{args.accelerator_type} slice {args.name!r} ({workers} worker VMs) '
               f'in {args.zone}, runtime {version}')
    argv = [*_gcloud(args, 'tpu-vm', 'create'), f'--accelerator-type={args.accelerator_type}',
            f'--version={version}']
  return [Command(tuple(argv + (['--spot'] if args.spot else [])))]


def setup(args: argparse.Namespace) -> list[Command]:
  """Puts the code in ~/ppflow_jax on every worker and installs it into ~/ppflow_jax/.venv."""
  py = args.python
  if not re.fullmatch(r'[A-Za-z0-9_./-]+', py):
    raise LaunchError(f'--python={py!r}: expected an interpreter name such as python3.11')
  install = (f'cd {_REPO_DIR} && '
             f'if ! {py} -m venv .venv; then sudo apt-get update -qq && '
             f'sudo apt-get install -y -qq {py} {py}-venv && {py} -m venv .venv; fi && '
             '.venv/bin/pip install -q -U pip && '
             '.venv/bin/pip install -q -r requirements.txt && '
             f'.venv/bin/pip install -q -U "{_jax_pin()}"')
  if args.repo_url:
    if not re.match(r'^(https://|git@|ssh://)\S+$', args.repo_url):
      raise LaunchError(f'--repo_url={args.repo_url!r}: expected an https://, ssh:// or git@ URL '
                        'that every worker can clone')
    branch = f' --branch={shlex.quote(args.branch)}' if args.branch else ''
    common.say(f'clone {args.repo_url} into ~/{_REPO_DIR} on every worker (or pull if present)')
    fetch = (f'if [ -d {_REPO_DIR}/.git ]; then git -C {_REPO_DIR} pull --ff-only; else '
             f'git clone --depth=1{branch} {shlex.quote(args.repo_url)} {_REPO_DIR}; fi')
    commands = []
  else:
    present = [p for p in _BUNDLED if (common.REPO_ROOT / p).exists()]
    missing = {'ppflow_jax', 'requirements.txt'} - set(present)
    if missing:
      raise LaunchError(f'{common.REPO_ROOT} lacks {sorted(missing)}: run setup from a full '
                        'checkout, or pass --repo_url to clone on the workers')
    bundle = f'{tempfile.gettempdir()}/{_BUNDLE}'
    common.say(f'pack {", ".join(present)} from {common.REPO_ROOT} and copy them to '
               f'~/{_REPO_DIR} on every worker (replacing an older copy, keeping its .venv)')
    commands = [
        Command(('tar', 'czf', bundle, '--exclude=__pycache__', '--exclude=*.pyc',
                 '-C', str(common.REPO_ROOT), *present)),
        Command((*_gcloud(args, 'tpu-vm', 'scp', operands=(bundle, f'{args.name}:{_BUNDLE}')),
                 '--worker=all')),
    ]
    stale = ' '.join(f'{_REPO_DIR}/{p}' for p in present)
    fetch = (f'rm -rf {stale} && mkdir -p {_REPO_DIR} && tar xzf {_BUNDLE} -C {_REPO_DIR} && '
             f'rm {_BUNDLE}')
  common.say(f'install requirements.txt and {_jax_pin()} into ~/{_REPO_DIR}/.venv with {py} '
             'on every worker')
  return commands + [_ssh_all(args, f'{fetch} && {install}')] + _mount(args)


def _mount(args: argparse.Namespace) -> list[Command]:
  """Installs gcsfuse and mounts `--gcs_bucket` at `--mount_point` on every worker (if given)."""
  if not args.gcs_bucket:
    if args.mount_point:
      raise LaunchError('--mount_point is where --gcs_bucket is mounted; give --gcs_bucket too')
    return []
  bucket = common.check_bucket(args.gcs_bucket)
  mount = args.mount_point or f'/gcs/{bucket}'
  if not re.fullmatch(r'(/[A-Za-z0-9_.-]+)+', mount) or '/../' in f'{mount}/':
    raise LaunchError(f'--mount_point={mount!r}: expected an absolute directory path such as '
                      f'/gcs/{bucket} (letters, digits, _ . - only)')
  common.say(f'install gcsfuse (if missing) and mount gs://{bucket} at {mount} on every worker; '
             f'then pass paths under it, e.g. --workdir={mount}/ppflow/RUN_NAME')
  # Mounted as the login user (who runs main), so it can write; rerun after a VM restart.
  script = (f'if ! command -v gcsfuse > /dev/null; then {_GCSFUSE_INSTALL}; fi && '
            f'if ! mountpoint -q {mount}; then sudo mkdir -p {mount} && '
            f'sudo chown "$(id -u):$(id -g)" {mount} && '
            f'gcsfuse {common.GCSFUSE_FLAGS} {bucket} {mount}; fi')
  return [_ssh_all(args, script)]


def run(args: argparse.Namespace, main_args: list[str]) -> list[Command]:
  workers = num_workers(args.accelerator_type)
  config = common.resolve_config(args.config, remote=True)
  workdir = common.check_workdir(
      args.workdir, multi_host=workers > 1,
      why=f'{args.accelerator_type} has {workers} worker VMs')
  env = common.parse_env(args.env)
  argv = [*common.env_argv(env),
          *common.main_argv(_VENV_PYTHON, config, workdir, args.mode, main_args)]
  data_paths = [a.split('=', 1)[1] for a in main_args if a.startswith('--config.data.path=')]
  if workers > 1:
    if not common.is_gcs(workdir):  # a bucket URL is shared by every worker by construction
      common.say(f'workdir {workdir} must be the same shared file system on every worker (e.g. '
                 'the bucket mounted by `setup --gcs_bucket`)')
    for path in (p for p in data_paths if p and not common.is_gcs(p)):
      common.say(f'every worker reads --config.data.path={path}: it must be on the shared mount '
                 'or copied to that path on each worker')
  common.say(f'run ppflow_jax.main --mode={args.mode} on all {workers} worker(s) of '
             f'{args.name!r}, checkpoints in {workdir}')
  if args.mode == 'train':
    common.say('after a preemption, rerun this same command: training resumes from the latest '
               'checkpoint in the workdir')
  line = shlex.join(argv)
  if args.detach:
    common.say(f'detached: output goes to ~/{_REPO_DIR}/{_LOG} on every worker')
    line = f'nohup {line} > {_LOG} 2>&1 < /dev/null &'
  return [_ssh_all(args, f'cd {_REPO_DIR} && {line}')]


def delete(args: argparse.Namespace) -> list[Command]:
  if args.queued:
    common.say(f'delete queued resource {args.name!r} and its slice in {args.zone}')
    argv = [*_gcloud(args, 'queued-resources', 'delete'), '--force', '--quiet']
  else:
    common.say(f'delete TPU VM slice {args.name!r} in {args.zone}')
    argv = [*_gcloud(args, 'tpu-vm', 'delete'), '--quiet']
  return [Command(tuple(argv))]


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='tpu_vm.py', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='Flags after `--` go to ppflow_jax.main unchanged (run only).')
  sub = p.add_subparsers(dest='command', required=True)

  def add(name: str, help_text: str) -> argparse.ArgumentParser:
    s = sub.add_parser(name, help=help_text)
    s.add_argument('--name', required=True, help='TPU VM / slice name')
    s.add_argument('--zone', required=True, help='e.g. us-east5-a, us-central2-b, europe-west4-a')
    s.add_argument('--project', default='', help='GCP project (default: gcloud config)')
    s.add_argument('--dry_run', action='store_true', help='only print the commands')
    return s

  s = add('create', 'create a TPU VM slice')
  s.add_argument('--accelerator_type', required=True,
                 help='v4-32, v5p-64, v5litepod-16, v6e-8, ...')
  s.add_argument('--version', default='',
                 help='runtime image (default per family: ' +
                 ', '.join(f'{k}: {v[0]}' for k, v in _FAMILIES.items()) + ')')
  s.add_argument('--spot', action='store_true', help='spot capacity (cheaper, preemptible)')
  s.add_argument('--queued', action='store_true', help='request through a queued resource')

  s = add('setup', 'copy the code to every worker and install it')
  s.add_argument('--repo_url', default='', help='clone this git URL on the workers instead of '
                 'copying the local checkout')
  s.add_argument('--branch', default='', help='branch or tag for --repo_url')
  s.add_argument('--python', default='python3.11', help='interpreter that creates the venv '
                 '(installed with apt if missing)')
  s.add_argument('--gcs_bucket', default='', metavar='NAME', help='install gcsfuse and mount '
                 'this Cloud Storage bucket on every worker (for --workdir and latents)')
  s.add_argument('--mount_point', default='', help='where to mount --gcs_bucket (default: '
                 '/gcs/NAME)')

  s = add('run', 'run ppflow_jax.main on every worker')
  s.add_argument('--accelerator_type', required=True,
                 help='the slice type (tells how many workers share the workdir)')
  s.add_argument('--config', required=True,
                 help='config file in this repo, e.g. configs/ppf_xl_2.py[:arg]')
  s.add_argument('--workdir', required=True, help='checkpoints and samples; on multi-host an absolute path on a shared mount, '
                 'e.g. gs://my-bucket/RUN or a gcsfuse mount /gcs/my-bucket/RUN')
  s.add_argument('--mode', default='train', choices=common.MODES)
  s.add_argument('--env', action='append', default=[], metavar='NAME=VALUE',
                 help='environment variable for main (repeatable)')
  s.add_argument('--detach', action='store_true',
                 help=f'keep running after ssh disconnects; output to ~/{_REPO_DIR}/{_LOG}')

  s = add('delete', 'delete the slice')
  s.add_argument('--queued', action='store_true', help='it was created with --queued')
  return p


def main(argv: list[str]) -> int:
  argv, main_args = common.split_passthrough(argv)
  args = _parser().parse_args(argv)
  if main_args and args.command != 'run':
    raise LaunchError(f'flags after `--` are only for `run`, not `{args.command}`')
  _check_target(args)
  if args.command == 'run':
    commands = run(args, common.check_main_args(main_args))
  else:
    commands = {'create': create, 'setup': setup, 'delete': delete}[args.command](args)
  if not args.dry_run:
    common.require_tool('gcloud', 'install the Google Cloud CLI '
                        '(https://cloud.google.com/sdk/docs/install) and run `gcloud auth login`')
  return common.execute(commands, args.dry_run)


if __name__ == '__main__':
  common.cli(main)
