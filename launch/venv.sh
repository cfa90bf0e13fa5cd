# Sourced by the quick-start scripts: makes sure a virtual environment exists and is active, then
# installs the project into it (`venv_install REQUIREMENTS_FILE [EXTRA]`). Stock Debian 12 refuses
# `pip install` into the system Python (PEP 668), so nothing is installed there.
#   - already inside a virtual environment (VIRTUAL_ENV or CONDA_PREFIX set): that one is used;
#   - otherwise ${PPFLOW_VENV:-.venv} is created once. It sees the system's site-packages, so
#     packages already installed at the pinned versions are reused instead of downloaded again.

ensure_venv() {
  if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then
    PY=python3
    return
  fi
  local dir="${PPFLOW_VENV:-.venv}"
  if [ ! -x "$dir/bin/python" ]; then
    if ! python3 -m venv --system-site-packages "$dir" 2>/dev/null; then
      # Debian/Ubuntu ship venv's pip bootstrap separately.
      rm -rf "$dir"
      if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
      $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv --system-site-packages "$dir"
    fi
  fi
  # shellcheck disable=SC1091
  . "$dir/bin/activate"
  PY=python
}

# venv_install REQUIREMENTS_FILE [EXTRA]: the exact pins of the file, then this project (editable,
# so the checkout is what runs) with the optional extra.
venv_install() {
  ensure_venv
  local target="."
  if [ -n "${2:-}" ]; then target=".[$2]"; fi
  $PY -m pip install -q --disable-pip-version-check -r "$1" -e "$target"
}
