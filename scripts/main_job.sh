#!/usr/bin/env bash
# The README's first command: installs the environment and the Fashion-MNIST files, then trains
# the same SimCLR model on long-tailed Fashion-MNIST with NT-Xent, NT-Xent with a cosine
# temperature schedule, SogCLR, iSogCLR and DySTreSS, evaluates each, and writes a report
# (about eight minutes on two idle CPU cores; a GPU is used when there is one).
# Extra arguments go to `python -m recipes.longtail` (see --help), e.g. --seeds 0 1 2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m recipes.longtail "$@"
