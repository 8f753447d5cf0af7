#!/usr/bin/env bash
# Creates .venv with the project and its pinned dependencies, and installs the Fashion-MNIST
# files from Debian when apt is available. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade uv >/dev/null 2>&1 || true
if [ -x .venv/bin/uv ]; then
  .venv/bin/uv pip install --python .venv/bin/python -q --compile-bytecode -c constraints.txt -e ".[dev]"
else
  .venv/bin/python -m pip install -q --compile -c constraints.txt -e ".[dev]"
fi
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "warning: could not install Debian's dataset-fashion-mnist; tests that need it will fail" >&2
fi
