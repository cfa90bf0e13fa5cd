#!/usr/bin/env bash
# Installs everything the tests need from the project's own files, then runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) >/dev/null
fi
python3 -m pip install -q -r requirements-test.txt
python3 -m pytest -q -n 2 -m "not slow" tests "$@"
