#!/usr/bin/env bash
# Step 1 of the CC3M recipe: CC3M's URL list -> webdataset shards (img2dataset) -> key index.
#
# Usage: recipes/cc3m/download.sh URL_LIST OUTPUT_DIR [PROCESSES] [THREADS]
#   URL_LIST    Google's Train_GCC-training.tsv (headerless: caption<TAB>url) or any TSV with
#               url and caption columns.
#   OUTPUT_DIR  gets shards/{00000..NNNNN}.tar (+ .parquet, _stats.json) and shards/key_index.*
#   PROCESSES   img2dataset download processes (default 16)
#   THREADS     threads per process (default 64)
#
# Needs `pip install img2dataset` (not a dependency of this project) and a network connection.
# Expected size: the URL list has 3,318,333 pairs; links rot, so a download today keeps roughly
# 2.7-2.9 million (FastCLIP got 2,723,840; the iSogCLR code sizes its tables for 2.9 million).
# Images are stored with the shorter side resized down to 256 px (never up) as JPEG quality 95,
# in 332 shards of 10,000 URLs each.
set -euo pipefail
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h | --help) usage; exit 0 ;; esac
if [ $# -lt 2 ]; then usage >&2; exit 2; fi
URL_LIST=$1
OUTPUT_DIR=$2
PROCESSES=${3:-16}
THREADS=${4:-64}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

mkdir -p "$OUTPUT_DIR"
# Checks the url and caption columns; a headerless Google file gets a copy with a header.
URL_LIST=$("$PYTHON" -m recipes.cc3m.tsv "$URL_LIST" --headered-copy "$OUTPUT_DIR/cc3m_urls.tsv")
if ! command -v img2dataset >/dev/null 2>&1; then
  echo "error: img2dataset is not installed; run 'pip install img2dataset' first" >&2
  exit 2
fi

img2dataset \
  --url_list "$URL_LIST" \
  --input_format tsv \
  --url_col url \
  --caption_col caption \
  --output_format webdataset \
  --output_folder "$OUTPUT_DIR/shards" \
  --number_sample_per_shard 10000 \
  --processes_count "$PROCESSES" \
  --thread_count "$THREADS" \
  --image_size 256 \
  --resize_mode keep_ratio \
  --resize_only_if_bigger True \
  --encode_format jpg \
  --encode_quality 95 \
  --retries 2 \
  --timeout 10 \
  --enable_wandb False

# The shards' brace pattern (for --train-data) and the download's counts.
PATTERN=$("$PYTHON" -m recipes.cc3m.shards "$OUTPUT_DIR/shards")
# Dense key -> index map for the per-sample state of sogclr/isogclr (built once, saved beside).
"$PYTHON" -m openclip_tau.key_index --shards "$PATTERN" --output "$OUTPUT_DIR/shards/key_index.txt"
echo "train data: $PATTERN"
echo "key index:  $OUTPUT_DIR/shards/key_index.txt"
