"""What the launch scripts share: input checks, the `ppflow_jax.main` command line, and printing or
running shell commands (with `--dry_run` they are only printed).

The scripts run as files (`python launch/tpu_vm.py ...`), so they import this module as `common`.
Every command is printed exactly as it is run, one per line; lines starting with `#` describe the
plan.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from typing import Callable, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
MODES = ('train', 'sample', 'sample_fid')
# Flags of `ppflow_jax.main` the launchers set themselves: users give them to the launcher instead.
_LAUNCHER_FLAGS = ('--config', '--workdir', '--mode', '--coordinator_address', '--num_processes',
                   '--process_id')
# Cloud Storage bucket names: 3-63 characters (up to 222 with dots, 63 per dot-separated part).
_BUCKET = re.compile(r'^[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]$')
_MOUNT_ROOT = '/gcs'  # where the docs and `tpu_vm.py setup --gcs_bucket` mount buckets.
# gcsfuse options for a workdir bucket: show directories that exist only as object prefixes, and
# allow directory renames, which orbax uses to finalize every checkpoint (gcsfuse refuses them on
# flat-namespace buckets by default; there they become copies, hierarchical-namespace buckets
# rename natively).
GCSFUSE_FLAGS = '--implicit-dirs --rename-dir-limit=100000'
_ENV_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')


class LaunchError(Exception):
  """Bad input or a missing tool; the scripts print `error: <message>` and exit with status 2."""


@dataclasses.dataclass(frozen=True)
class Command:
  """One process to start: its argv and, for local commands, the directory it starts in."""
  argv: tuple[str, ...]
  cwd: str | None = None

  def __str__(self) -> str:
    line = shlex.join(self.argv)
    return f'cd {shlex.quote(self.cwd)} && {line}' if self.cwd else line


def say(message: str) -> None:
  """Prints one line of the plan (as a shell comment, so the output stays pasteable)."""
  print(f'# {message}', flush=True)


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits `launcher args -- main args` at the first `--`; main args may be absent."""
  argv = list(argv)
  if '--' not in argv:
    return argv, []
  i = argv.index('--')
  return argv[:i], argv[i + 1:]


def check_main_args(args: Sequence[str]) -> list[str]:
  """Checks the flags forwarded to `ppflow_jax.main` (e.g. `--config.train.steps=100`); gs://
  values (e.g. `--config.data.path=gs://b/latents`) pass, main reads them natively (paths.py)."""
  for arg in args:
    if not arg.startswith('--'):
      raise LaunchError(f'{arg!r} after `--` is not a flag; everything after `--` goes to '
                        'ppflow_jax.main, e.g. `-- --config.train.steps=1000`')
    name = arg.split('=', 1)[0]
    if name in _LAUNCHER_FLAGS:
      raise LaunchError(f'{name} after `--` is set by the launcher itself; use the launcher '
                        'option of that name before `--` (see --help)')
    value = arg.partition('=')[2]
    if is_gcs(value):
      check_gcs_url(name, value)
  return list(args)


def resolve_config(spec: str, remote: bool) -> str:
  """`configs/x.py[:arg]` -> the path to pass to main, after checking the file exists here.

  Remote runs start in the copied repository, so their config must live inside this repository and
  is returned relative to its root; local runs also accept any other file (returned absolute).
  """
  path_str, sep, arg = spec.partition(':')
  if not path_str.endswith('.py'):
    raise LaunchError(f'--config={spec!r}: expected a Python config file such as '
                      'configs/ppf_xl_2.py (optionally followed by :arg)')
  path = pathlib.Path(path_str).expanduser()
  candidates = [path] if path.is_absolute() else list(
      dict.fromkeys([pathlib.Path.cwd() / path, REPO_ROOT / path]))
  found = next((p.resolve() for p in candidates if p.is_file()), None)
  if found is None:
    raise LaunchError(f'--config={path_str!r}: no such file (looked at '
                      f'{", ".join(str(p) for p in candidates)}); the configs are in '
                      f'{REPO_ROOT}/configs')
  try:
    result = found.relative_to(REPO_ROOT).as_posix()
  except ValueError:
    if remote:
      raise LaunchError(f'--config={path_str!r} is outside the repository {REPO_ROOT}; only the '
                        'repository is copied to the other machines, so put the config under '
                        'configs/') from None
    result = str(found)
  return result + sep + arg


def is_gcs(path: str) -> bool:
  return path.startswith('gs://')


def check_bucket(name: str) -> str:
  """Checks a Cloud Storage bucket name (`my-bucket`, without gs://)."""
  parts = name.split('.')
  if (not _BUCKET.match(name) or any(not 0 < len(p) <= 63 for p in parts)
      or (len(parts) == 1 and len(name) > 63) or name.startswith('goog')):
    raise LaunchError(f'bucket name {name!r} is not valid: 3-63 lower case letters, digits, - and _ '
                      '(dots allowed), starting and ending with a letter or digit, not starting '
                      'with "goog"; give the name only, e.g. my-bucket, not gs://my-bucket')
  return name


def check_gcs_url(what: str, url: str) -> str:
  """Checks a gs:// URL (`gs://bucket/dir`): main reads and writes it natively through etils.epath
  (fsspec/gcsfs) and orbax, so it needs no mount; a gcsfuse mount path works too."""
  bucket = url[len('gs://'):].partition('/')[0]
  if not bucket:
    raise LaunchError(f'{what}={url!r}: no bucket name; expected gs://BUCKET/path')
  check_bucket(bucket)
  return url


def check_workdir(workdir: str, multi_host: bool, why: str = '') -> str:
  """Checks `workdir`: a gs:// URL, or a file system path; where several hosts write checkpoints,
  an absolute path on a file system they all share (a gcsfuse-mounted bucket, Filestore/NFS)."""
  if not workdir:
    raise LaunchError('--workdir is required (on multi-host runs an absolute path on a shared file '
                      f'system, e.g. {_MOUNT_ROOT}/my-bucket/ppflow/RUN_NAME)')
  if is_gcs(workdir):
    return check_gcs_url('--workdir', workdir)  # shared by every host by construction
  if '://' in workdir:
    raise LaunchError(f'--workdir={workdir!r}: expected a file system path or a gs:// URL (mount '
                      'other remote storage and pass its mounted path)')
  if multi_host and not workdir.startswith('/'):
    raise LaunchError(f'--workdir={workdir!r} is a relative path, but {why}: every host must read '
                      'and write the same checkpoints, so use an absolute path on a file system '
                      f'shared by all hosts, e.g. {_MOUNT_ROOT}/my-bucket/ppflow/RUN_NAME (a bucket '
                      'mounted with gcsfuse on every host) or a Filestore/NFS mount')
  return workdir


def parse_env(assignments: Sequence[str]) -> dict[str, str]:
  """`['K=V', ...]` (from repeated `--env K=V`) -> ordered dict, checking variable names."""
  env = {}
  for item in assignments:
    name, sep, value = item.partition('=')
    if not sep or not _ENV_NAME.match(name):
      raise LaunchError(f'--env {item!r}: expected NAME=VALUE with a shell variable name')
    env[name] = value
  return env


def env_argv(env: dict[str, str]) -> list[str]:
  """`env K=V ...` prefix that sets `env` for one command (empty if there is nothing to set)."""
  return ['env', *(f'{k}={v}' for k, v in env.items())] if env else []


def main_argv(python: str, config: str, workdir: str, mode: str,
              main_args: Sequence[str]) -> list[str]:
  """The `ppflow_jax.main` command line (the launchers append distributed flags where needed)."""
  if mode not in MODES:
    raise LaunchError(f'--mode={mode!r} must be one of {list(MODES)}')
  return [python, '-m', 'ppflow_jax.main', f'--config={config}', f'--workdir={workdir}',
          f'--mode={mode}', *main_args]


def require_tool(name: str, hint: str) -> None:
  """Fails clearly when `name` is not on PATH (only checked when commands will really run)."""
  if shutil.which(name) is None:
    raise LaunchError(f'`{name}` was not found on PATH; {hint}. Use --dry_run to only print the '
                      'commands.')


def execute(commands: Sequence[Command], dry_run: bool, parallel: bool = False) -> int:
  """Prints every command, then (unless `dry_run`) runs them: in order, stopping at the first
  failure, or all at once when `parallel` (one per host). Returns the exit status for the script."""
  for c in commands:
    print(c, flush=True)
  if dry_run:
    say('dry run: nothing was executed')
    return 0
  if not parallel:
    for c in commands:
      rc = subprocess.run(c.argv, cwd=c.cwd, check=False).returncode
      if rc:
        print(f'error: command failed with exit status {rc}: {c}', file=sys.stderr)
        return rc
    return 0
  procs = [subprocess.Popen(c.argv, cwd=c.cwd) for c in commands]
  try:
    codes = [p.wait() for p in procs]
  except KeyboardInterrupt:
    for p in procs:
      p.terminate()
    raise
  failed = [(i, rc) for i, rc in enumerate(codes) if rc]
  for i, rc in failed:
    print(f'error: process {i} failed with exit status {rc}: {commands[i]}', file=sys.stderr)
  return failed[0][1] if failed else 0


def cli(main: Callable[[list[str]], int]) -> None:
  """Runs `main(sys.argv[1:])`, turning a LaunchError into `error: ...` and exit status 2."""
  try:
    sys.exit(main(sys.argv[1:]))
  except LaunchError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
