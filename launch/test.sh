#!/usr/bin/env bash
# Installs the project with its test extras into a virtual environment (launch/venv.sh), with the
# exact pins of requirements-test.txt, then runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) >/dev/null
fi
. launch/venv.sh
venv_install requirements-test.txt test
$PY -m pytest -q -n 2 -m "not slow" tests "$@"
