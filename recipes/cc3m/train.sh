#!/usr/bin/env bash
# Step 2 of the CC3M recipe: trains one loss with the published CC3M settings (resumable).
#
# Usage: DATA=/data/cc3m/shards recipes/cc3m/train.sh LOSS [more openclip_tau.train options]
#   LOSS  clip | siglip | sogclr | isogclr | rgclg | tempnet | dystress
#
# Settings (docs/methods.md, the iSogCLR CC3M recipe): global batch 512, AdamW lr 2e-4, wd 0.02,
# cosine schedule after 2000 warmup steps, 30 epochs, mixed precision.
#   isogclr   rho 6.0, tau_init 0.01 in [0.005, 1.0], eta 0.03, beta 0.9, gamma 0.8
#   sogclr    tau 0.01, gamma 0.9
#   rgclg     FastCLIP-v3's CC3M setting: tau_init 0.07 in [0.01, 1.0], rho 6.5, its AdamW lr 2e-4
#             (divided by 3 once tau <= 0.03), gamma 0.2 after a cosine decay over 18 epochs
#   tempnet   TempNet's CC3M script: rho 7.0, tau in [0.005, 0.05], networks' Adam lr 3e-5 x 0.9
#             per epoch, gamma 0.8
#   dystress  tau(s) from 0.01 (s = 0) to 0.04 (s = +-1)
#   clip      learned logit scale, --local-loss --gather-with-grad (exact global-batch gradient)
#   siglip    upstream's SigLIP loss and its initialisation
# Options after LOSS are appended and win (e.g. --tau-gamma-decay-epochs 15 for FastCLIP's
# cosine gamma, --tau-rho 8.0).
#
# Environment (defaults in brackets):
#   DATA           img2dataset shard folder with key_index.txt (download.sh) [required]
#   MODEL          RN50-distilbert-size | ViT-B-32 | any open_clip model [RN50-distilbert-size]
#   NPROC          processes (GPUs) per node [GPUs seen by nvidia-smi, else 1]
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   several nodes (slurm.sbatch sets them) [1, 0]
#   GLOBAL_BATCH [512]  EPOCHS [30]  LR [2e-4]  WD [0.02]  WARMUP [2000]  WORKERS [8]
#   PRECISION [amp]  LOGS [./logs]  NAME [cc3m-LOSS-MODEL]  SEED [0]
#   TRAIN_NUM_SAMPLES  samples per epoch [the number of pairs in DATA]
#   PYTHON [python]
#   DRY_RUN=1      print the command (shell-quoted) instead of running it
# Run it again with the same NAME to continue from the last checkpoint (--resume latest).
set -euo pipefail
usage() { sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h | --help) usage; exit 0 ;; esac
if [ $# -lt 1 ]; then usage >&2; exit 2; fi
LOSS=$1
shift
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

case "$LOSS" in
  clip) LOSS_ARGS=(--local-loss --gather-with-grad) ;;
  siglip) LOSS_ARGS=() ;;
  sogclr) LOSS_ARGS=(--tau-temperature 0.01 --tau-gamma 0.9) ;;
  isogclr)
    LOSS_ARGS=(--tau-rho 6.0 --tau-init 0.01 --tau-min 0.005 --tau-max 1.0
      --tau-eta 0.03 --tau-beta 0.9 --tau-gamma 0.8) ;;
  rgclg)
    LOSS_ARGS=(--tau-rho 6.5 --tau-init 0.07 --tau-min 0.01 --tau-max 1.0 --tau-lr 2e-4
      --tau-gamma 0.2 --tau-gamma-decay-epochs 18) ;;
  tempnet)
    LOSS_ARGS=(--tau-rho 7.0 --tau-min 0.005 --tau-max 0.05 --tau-lr 3e-5 --tau-gamma 0.8) ;;
  dystress) LOSS_ARGS=(--tau-min 0.01 --tau-max 0.04) ;;
  *)
    echo "error: LOSS must be one of clip, siglip, sogclr, isogclr, rgclg, tempnet, dystress; got '$LOSS'" >&2
    exit 2 ;;
esac
if [ -z "${DATA:-}" ]; then
  echo "error: set DATA to the img2dataset shard folder (recipes/cc3m/download.sh writes it)" >&2
  exit 2
fi
MODEL=${MODEL:-RN50-distilbert-size}
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "$NPROC" -ge 1 ] 2>/dev/null || NPROC=1
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GLOBAL_BATCH=${GLOBAL_BATCH:-512}
WORLD=$((NPROC * NNODES))
if [ $((GLOBAL_BATCH % WORLD)) -ne 0 ]; then
  echo "error: GLOBAL_BATCH $GLOBAL_BATCH is not divisible by $WORLD processes" >&2
  exit 2
fi
BATCH=$((GLOBAL_BATCH / WORLD))

# Shards, their count and the key index; each command names what is missing.
TRAIN_DATA=$("$PYTHON" -m recipes.cc3m.shards "$DATA")
TRAIN_NUM_SAMPLES=${TRAIN_NUM_SAMPLES:-$("$PYTHON" -m recipes.cc3m.shards "$DATA" --count 2>/dev/null)}
KEY_INDEX="$DATA/key_index.txt"
if [ "$LOSS" != clip ] && [ "$LOSS" != siglip ] && [ "$LOSS" != dystress ]; then
  if [ ! -f "$KEY_INDEX" ]; then
    echo "error: $KEY_INDEX not found; build it with" >&2
    echo "  $PYTHON -m openclip_tau.key_index --shards \"$TRAIN_DATA\" --output $KEY_INDEX" >&2
    exit 2
  fi
  LOSS_ARGS+=(--tau-key-index "$KEY_INDEX")
fi

ARGS=(
  --loss "$LOSS" "${LOSS_ARGS[@]}"
  --add-model-config "$REPO/recipes/cc3m/model_configs"
  --model "$MODEL"
  --train-data "$TRAIN_DATA"
  --dataset-type webdataset
  --train-num-samples "$TRAIN_NUM_SAMPLES"
  --batch-size "$BATCH"
  --epochs "${EPOCHS:-30}"
  --lr "${LR:-2e-4}"
  --wd "${WD:-0.02}"
  --warmup "${WARMUP:-2000}"
  --lr-scheduler cosine
  --precision "${PRECISION:-amp}"
  --workers "${WORKERS:-8}"
  --seed "${SEED:-0}"
  --save-frequency 1
  --zeroshot-frequency 0
  --report-to tensorboard
  --logs "${LOGS:-./logs}"
  --name "${NAME:-cc3m-$LOSS-$MODEL}"
  --resume latest
  "$@"
)
if [ "$WORLD" -eq 1 ]; then
  COMMAND=("$PYTHON" -m openclip_tau.train "${ARGS[@]}")
else
  # "--" keeps torchrun from reading script options that are prefixes of its own (--logs).
  COMMAND=("$PYTHON" -m torch.distributed.run
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC"
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}"
    -m openclip_tau.train -- "${ARGS[@]}")
fi
if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${COMMAND[@]}"
  echo
  exit 0
fi
exec "${COMMAND[@]}"
