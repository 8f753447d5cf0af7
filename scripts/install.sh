#!/usr/bin/env bash
# Creates a virtual environment with the project (editable) and its test dependencies, and
# installs the Fashion-MNIST files from Debian when apt is available. Safe to run again.
#
#   TAU_DEPS=pinned  (default) .venv         the versions of constraints.txt
#   TAU_DEPS=newest            .venv-newest  the newest releases the package index offers
#   TAU_DEPS=lowest            .venv-lowest  the lowest versions pyproject.toml allows for the
#                                            project's direct dependencies (uv --resolution
#                                            lowest-direct): a check of the declared floors
# TAU_VENV overrides the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
DEPS="${TAU_DEPS:-pinned}"
case "$DEPS" in
  pinned) VENV="${TAU_VENV:-.venv}"; PICK=(-c constraints.txt) ;;
  newest) VENV="${TAU_VENV:-.venv-newest}"; PICK=(--upgrade) ;;
  lowest) VENV="${TAU_VENV:-.venv-lowest}"; PICK=(--resolution lowest-direct) ;;
  *) echo "TAU_DEPS must be pinned, newest or lowest, got '$DEPS'" >&2; exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade uv >/dev/null 2>&1 || true
if [ -x "$VENV/bin/uv" ]; then
  "$VENV/bin/uv" pip install --python "$VENV/bin/python" -q --compile-bytecode "${PICK[@]}" -e ".[dev]"
elif [ "$DEPS" = lowest ]; then
  echo "TAU_DEPS=lowest needs uv (pip has no lowest-direct resolution)" >&2; exit 2
else
  "$VENV/bin/python" -m pip install -q --compile "${PICK[@]}" -e ".[dev]"
fi
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "warning: could not install Debian's dataset-fashion-mnist; tests that need it will fail" >&2
fi
