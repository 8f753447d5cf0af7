#!/usr/bin/env bash
# OpenCLIP training with iSogCLR's loss on img2dataset webdataset shards (e.g. CC3M).
#
#   bash examples/openclip/train.sh SHARDS NUM_SAMPLES [open_clip_train options ...]
#   bash examples/openclip/train.sh "/data/cc3m/{00000..00331}.tar" 2800000
#   torchrun: LAUNCH="torchrun --nproc-per-node 8 -m --" bash examples/openclip/train.sh ...
#
# Options after NUM_SAMPLES are appended and win over the ones below (argparse keeps the last),
# e.g. --loss sogclr, --model ViT-B-32, --resume latest, --tau-state sharded.
set -euo pipefail
SHARDS=$1
NUM_SAMPLES=$2
shift 2
PYTHON=${PYTHON:-python}
LAUNCH=${LAUNCH:-$PYTHON -m}
KEY_INDEX=${KEY_INDEX:-$(dirname "$SHARDS")/key_index.txt}

# once: a dense key-to-index map over the shards, saved beside them
if [ ! -f "$KEY_INDEX" ]; then
  "$PYTHON" -m openclip_tau.key_index --shards "$SHARDS" --output "$KEY_INDEX"
fi

# train; add --resume latest to continue a killed run with its loss state
$LAUNCH openclip_tau.train --loss isogclr --tau-key-index "$KEY_INDEX" \
  --train-data "$SHARDS" --dataset-type webdataset --train-num-samples "$NUM_SAMPLES" \
  --model RN50 --batch-size 64 --epochs 30 --lr 2e-4 --wd 0.02 --precision amp --workers 8 \
  --logs logs --name cc3m-isogclr --report-to tensorboard "$@"
