#!/usr/bin/env bash
# The README's first command: installs the environment and the Fashion-MNIST files, then trains
# the same SimCLR model on long-tailed Fashion-MNIST with NT-Xent, NT-Xent with a cosine
# temperature schedule, Lightly's MACL, SogCLR, iSogCLR and DySTreSS (9 epochs each), runs
# iSogCLR for two seeds under both the natural and a permuted class order to test its
# temperature-frequency claim (with a per-sample analysis against local density), evaluates
# each run, and writes a report to runs/longtail/ (about ten minutes on two idle CPU cores; a
# GPU is used when there is one).
# Extra arguments go to `python -m recipes.longtail` (see --help), e.g. --losses all (adds
# Lightly's DCL), --seeds 0 1 2, --claim-seeds 0 1 2, --epochs 12.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m recipes.longtail "$@"
