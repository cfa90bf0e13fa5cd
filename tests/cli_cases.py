"""Runs many command lines of one command (`ppflow_jax.main` or `ppflow_jax.evaluation.evaluate`)
in one process (one interpreter start instead of one per case): `python tests/cli_cases.py
CASES.json` with a JSON list of [module, *args] lists, all of one module, prints a JSON list of
{"code": exit status, "stderr": text} on its last line. Flags are reset between cases."""

import contextlib
import io
import json
import sys

from absl import flags

from ppflow_jax import cli
from ppflow_jax import main as main_lib
from ppflow_jax.evaluation import evaluate

COMMANDS = {'ppflow_jax.main': main_lib, 'ppflow_jax.evaluation.evaluate': evaluate}


def run_case(argv: list[str]) -> dict:
  if flags.FLAGS.is_parsed():
    flags.FLAGS.unparse_flags()
  for name in list(flags.FLAGS):  # overrides of the previous case's config, defined while parsing
    if name.startswith('config.'):
      delattr(flags.FLAGS, name)
  err = io.StringIO()
  code = 0
  with contextlib.redirect_stderr(err):
    try:
      cli.run(COMMANDS[argv[0]].main, argv=argv)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
  return {'code': code, 'stderr': err.getvalue()}


if __name__ == '__main__':
  with open(sys.argv[1]) as f:
    cases = json.load(f)
  (module,) = {case[0] for case in cases}  # one command's flags (main's are required flags)
  COMMANDS[module].define_flags()  # defined only when a module runs as a command
  print(json.dumps([run_case(argv) for argv in cases]))
