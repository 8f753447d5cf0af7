"""Training throughput of ``openclip_tau.train --loss isogclr`` against ``--loss clip`` on CPU.

Both losses run the same OpenCLIP training loop (``open_clip_train`` through
``openclip_tau.train``) on the same tiny registered model and synthetic data; only the loss
differs, so the ratio shows what the per-sample state and its bookkeeping (index queue, table
reads and writes, statistics) cost per step. Each run trains two epochs with OpenCLIP's default
logging cadence; the second epoch (data loading, forward, loss, backward, optimizer step, logging)
is timed, runs of the two losses alternate to spread machine noise, and the median over repeats
is compared. Target: >= 0.95.

Usage:
    python -m recipes.bench_openclip_throughput --batch-size 256 --steps 30 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import open_clip_train.train as upstream_train
import torch

from openclip_tau.train import main as train_main

MODEL = "bench-tiny"
MODEL_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def run_loss(loss: str, workdir: Path, name: str, args: argparse.Namespace) -> float:
    """Trains two epochs of ``--steps`` steps with ``loss``; samples/s of the second epoch."""
    num_samples = args.batch_size * args.steps
    loss_args = ["--loss", loss]
    if loss in ("sogclr", "isogclr"):
        loss_args += ["--tau-num-samples", str(num_samples)]
    epoch_seconds: list[float] = []
    train_one_epoch = upstream_train.train_one_epoch

    def timed_epoch(*epoch_args, **kwargs):
        start = time.perf_counter()
        train_one_epoch(*epoch_args, **kwargs)
        epoch_seconds.append(time.perf_counter() - start)

    upstream_train.train_one_epoch = timed_epoch  # openclip_tau.train calls it by this name
    try:
        code = train_main(
            loss_args
            + ["--add-model-config", str(workdir / f"{MODEL}.json")]
            + ["--model", MODEL, "--dataset-type", "synthetic"]
            + ["--train-num-samples", str(num_samples), "--batch-size", str(args.batch_size)]
            + ["--epochs", "2", "--lr", "1e-4", "--warmup", "1", "--workers", "0"]
            + ["--device", "cpu", "--precision", "fp32", "--save-frequency", "0"]
            + ["--logs", str(workdir / "logs"), "--name", name]
        )
    finally:
        upstream_train.train_one_epoch = train_one_epoch
    if code not in (None, 0) or len(epoch_seconds) != 2:
        raise RuntimeError(f"--loss {loss} training failed (code {code}).")
    return num_samples / epoch_seconds[1]


def main(argv: Optional[Sequence[str]] = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="training steps per epoch")
    parser.add_argument("--repeats", type=int, default=3, help="runs per loss, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--loss", default="isogclr", choices=("sogclr", "isogclr", "dystress"))
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.batch_size < 2:
        parser.error("--steps and --repeats must be >= 1 and --batch-size >= 2.")
    torch.set_num_threads(args.threads)
    throughputs: dict[str, list[float]] = {"clip": [], args.loss: []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / f"{MODEL}.json").write_text(json.dumps(MODEL_CONFIG))
        for repeat in range(args.repeats):
            for loss in throughputs:
                throughputs[loss].append(run_loss(loss, workdir, f"{loss}-{repeat}", args))
    medians = {loss: statistics.median(v) for loss, v in throughputs.items()}
    ratio = medians[args.loss] / medians["clip"]
    print(
        f"\nTraining throughput, tiny model, batch {args.batch_size}, CPU "
        f"({args.threads} thread(s)), {args.steps} timed steps, median of {args.repeats} runs:"
    )
    for loss, value in medians.items():
        runs = ", ".join(f"{v:.1f}" for v in throughputs[loss])
        print(f"  --loss {loss:<9} {value:9.1f} samples/s  (runs: {runs})")
    print(f"  ratio {args.loss} / clip: {ratio:.3f} (target >= 0.95)")
    return ratio


if __name__ == "__main__":
    main()
