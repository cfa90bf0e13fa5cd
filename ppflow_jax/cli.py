"""What every command-line entry point shares: configs by name, quiet logs, one-line errors.

`cli.run(main)` replaces `absl.app.run(main)`:
- `--config=ppf_xl_2` (or `ppf_xl_2.py`, `configs/ppf_xl_2.py`, `...:runlocal`) works from any
  directory: a path that does not exist is looked up by name among the packaged configs.
- absl/orbax INFO logs are off unless `--verbosity=1` (or `-v 1`) is given; warnings still show.
- A user mistake (a flag or config field that does not exist or does not parse, a missing file, a
  value a run cannot use) prints `error: <message>` and exits with status 2. The message is what
  our checks say; with `--verbosity>=1` the traceback is printed as well. Internal faults
  (anything else) keep their traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging

from ppflow_jax import config_lib
from ppflow_jax import errors

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Builtin types our own checks raise with a message meant for the user; raised elsewhere (numpy,
# jax, orbax internals), they are internal faults and keep their traceback.
_CHECK_TYPES = (ValueError, OSError, RuntimeError)
_INTERNAL_TYPES = (NotImplementedError, RecursionError)


def print_error(message: str) -> None:
  """Prints `error: message` on stderr as one write, so that no other thread's output (orbax's
  background logging) can land between the message and its newline."""
  sys.stderr.write(f'error: {message}\n')
  sys.stderr.flush()


def fail(message: str) -> None:
  """Prints `error: message` on stderr and exits with status 2."""
  print_error(message)
  sys.exit(2)


def _verbose(argv: Sequence[str]) -> bool:
  for i, arg in enumerate(argv):
    for name in ('--verbosity', '-v'):
      if arg == name and i + 1 < len(argv):
        arg = f'{name}={argv[i + 1]}'
      if arg.startswith(name + '='):
        try:
          return int(arg.split('=', 1)[1]) >= 1
        except ValueError:
          return False
  return False


def resolve_config_args(argv: Sequence[str]) -> list[str]:
  """Rewrites `--config=NAME[:arg]` to the config file's path (config_lib.find_config)."""
  out = []
  for arg in argv:
    if arg.startswith('--config=') and not arg.startswith('--config.'):
      try:
        arg = '--config=' + config_lib.find_config(arg[len('--config='):])
      except errors.UserError as e:
        fail(str(e))
    out.append(arg)
  return out


def _config_override_error(argv: Sequence[str]) -> str | None:
  """Names the first `--config.a.b=v` whose field does not exist in the loaded config."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None:
    return None
  config = config_lib.load_config(spec)
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    dotted = arg[len('--config.'):].split('=', 1)[0]
    node, parts = config, dotted.split('.')
    for i, part in enumerate(parts):
      if not hasattr(node, 'keys') or part not in node:
        where = 'config' + ''.join(f'.{p}' for p in parts[:i])
        known = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else 'none (not a group)'
        return (f'--config.{dotted}: {where} has no field {part!r} (its fields: {known}); '
                'see ppflow_jax/config_lib.py for the schema')
      node = node[part]
  return None


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing whose errors are one `error:` line (status 2) instead of a traceback."""
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    fail(f'{e}; see --helpfull for the flags')
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    # ml_collections raises these from inside flag parsing for config overrides.
    if _verbose(argv):
      traceback.print_exc()
    fail(_config_override_error(argv) or f'command-line flags: {type(e).__name__}: {e}')
  return []  # not reached


def _raised_by_project(exc: BaseException) -> bool:
  tb = exc.__traceback__
  last = None
  while tb is not None:
    last = tb
    tb = tb.tb_next
  return last is not None and os.path.abspath(
      last.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep)


def is_user_error(exc: BaseException) -> bool:
  """A UserError, or one of the check types with a message raised by ppflow_jax's own code."""
  if isinstance(exc, errors.UserError):
    return True
  return (isinstance(exc, _CHECK_TYPES) and not isinstance(exc, _INTERNAL_TYPES)
          and _raised_by_project(exc))


def run(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> None:
  """`absl.app.run(main)` with config names, quiet logs and one-line user errors."""
  argv = resolve_config_args(list(sys.argv if argv is None else argv))
  sys.argv = argv  # ml_collections finds the --config.x overrides in sys.argv
  verbose = _verbose(argv)

  def wrapped(args):
    if not verbose:
      logging.set_verbosity(logging.WARNING)
    try:
      return main(args)
    except app.UsageError as e:
      fail(f'{e} (see --helpfull)')
    except Exception as e:  # pylint: disable=broad-except
      if not is_user_error(e):
        raise
      if verbose:
        traceback.print_exc()
      fail(str(e))

  app.run(wrapped, argv=argv, flags_parser=parse_flags)
