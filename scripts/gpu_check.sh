#!/usr/bin/env bash
# The checks to run on a machine with an NVIDIA GPU, within 10 minutes, ending with one summary:
#   1. the fast test suite with the loss tests on CUDA (pytest --device cuda -m "not slow");
#   2. the loss benchmark on CUDA (recipes.benchmark_losses) and eager against compiled steps
#      (recipes.benchmark_compile);
#   3. the OpenCLIP throughput benchmark (recipes.bench_openclip_throughput);
#   4. one short python -m openclip_tau.train run on CUDA (mixed precision), and with two or
#      more GPUs the same run in two processes under torchrun (NCCL: the gathers and the
#      sharded state's all_to_all).
# Usage: bash scripts/gpu_check.sh [--dry-run]
#   --dry-run: no GPU needed; collects the tests, checks the benchmarks' options and runs tiny
#   versions of the compile benchmark and the training runs on the CPU (about a minute).
# PYTHON (default .venv/bin/python, made by scripts/install.sh) is the interpreter used.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || { echo "gpu_check: $PY not found; run scripts/install.sh first" >&2; exit 2; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
SUMMARY=()
FAILED=0

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, records the outcome
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS log="$WORK/$name.log"
  echo "== $name: $*"
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  tail -n 15 "$log"
  local verdict=PASS
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMEOUT(${limit}s)"; FAILED=1
  elif [ $rc -ne 0 ]; then verdict="FAIL(rc=$rc)"; FAILED=1; fi
  SUMMARY+=("$(printf '%-22s %-14s %4ss' "$name" "$verdict" $((SECONDS - t0)))")
}

if [ $DRY -eq 1 ]; then
  DEVICE=cpu; GPUS=0
else
  GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "$GPUS" -lt 1 ]; then
    echo "gpu_check: no CUDA device visible to torch (use --dry-run on a CPU machine)" >&2
    exit 2
  fi
  DEVICE=cuda
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '-', torch.cuda.device_count(), 'x', torch.cuda.get_device_name(0))"
fi

# The tiny model of the training runs (OpenCLIP reads model configs from JSON files).
cat >"$WORK/tau-tiny.json" <<'JSON'
{"embed_dim": 32,
 "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
JSON
train_args() {  # train_args NAME SAMPLES BATCH
  echo --loss isogclr --add-model-config "$WORK/tau-tiny.json" --model tau-tiny \
    --dataset-type synthetic --train-num-samples "$2" --batch-size "$3" --epochs 1 \
    --lr 1e-4 --warmup 1 --workers 0 --save-frequency 1 --logs "$WORK/logs" --name "$1"
}

if [ $DRY -eq 1 ]; then
  step tests-collect 120 "$PY" -m pytest -q --collect-only -m "not slow"
  step benchmark-losses 60 "$PY" -m recipes.benchmark_losses --help
  step benchmark-compile 120 "$PY" -m recipes.benchmark_compile --losses SogCLRClipLoss \
    --batch-size 16 --dim 16 --warmup 1 --repeats 1 --backend eager
  step openclip-throughput 60 "$PY" -m recipes.bench_openclip_throughput --help
  # shellcheck disable=SC2046
  step train 180 "$PY" -m openclip_tau.train $(train_args dry 64 16) --device cpu --precision fp32
else
  step tests-cuda 210 "$PY" -m pytest -q -x -m "not slow" --device cuda
  step benchmark-losses 90 "$PY" -m recipes.benchmark_losses --device cuda --repeats 3 \
    --skip-scaling
  step benchmark-compile 90 "$PY" -m recipes.benchmark_compile --device cuda --batch-size 1024 \
    --dim 512
  step openclip-throughput 60 "$PY" -m recipes.bench_openclip_throughput --steps 10 --repeats 1
  # shellcheck disable=SC2046
  step train 60 "$PY" -m openclip_tau.train $(train_args gpu 4096 256) --device cuda \
    --precision amp
  if [ "$GPUS" -ge 2 ]; then
    # shellcheck disable=SC2046
    step train-nccl-2gpu 90 "$PY" -m torch.distributed.run --nproc-per-node 2 -m -- \
      openclip_tau.train $(train_args nccl 4096 128) --tau-state sharded --precision amp
  else
    SUMMARY+=("$(printf '%-22s %-14s' train-nccl-2gpu "SKIP(1 GPU)")")
  fi
fi

echo
echo "== gpu_check summary ($([ $DRY -eq 1 ] && echo dry run on CPU || echo "$GPUS GPU(s)"), $((SECONDS - START))s)"
printf '%s\n' "${SUMMARY[@]}"
[ $FAILED -eq 0 ] && echo "gpu_check: all passed" || echo "gpu_check: FAILED"
exit $FAILED
