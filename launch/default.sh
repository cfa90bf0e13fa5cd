#!/usr/bin/env bash
# Quick start, first command: installs the project into a virtual environment (launch/venv.sh)
# and its embedded data (Fashion-MNIST from Debian's dataset-fashion-mnist package), then trains
# and reports the default config on CPU. Extra arguments go to main, e.g. --config.train.steps=200.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
. launch/venv.sh
venv_install requirements.txt
$PY -m ppflow_jax.main --config=configs/default.py --workdir="${WORKDIR:-workdir/default}" "$@"
