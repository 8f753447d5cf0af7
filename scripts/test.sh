#!/usr/bin/env bash
# The README's test command: installs what it needs, checks style, runs the test suite on CPU.
# Arguments go to pytest. TAU_DEPS=newest (or lowest) runs the suite against the newest
# releases (or the declared floors) in their own environment instead of the pinned set
# (see scripts/install.sh); style is checked with the pinned set only.
set -euo pipefail
cd "$(dirname "$0")/.."
DEPS="${TAU_DEPS:-pinned}"
bash scripts/install.sh
case "$DEPS" in
  pinned) VENV="${TAU_VENV:-.venv}" ;;
  *) VENV="${TAU_VENV:-.venv-$DEPS}" ;;
esac
if [ "$DEPS" = pinned ]; then
  "$VENV/bin/ruff" check .
  "$VENV/bin/ruff" format --check .
fi
"$VENV/bin/python" -c "import torch, lightly, open_clip
print('$DEPS dependencies: torch', torch.__version__, '- lightly', lightly.__version__,
      '- open_clip', open_clip.__version__)"
"$VENV/bin/python" -m pytest -q "$@"
