"""Smoke mode of the CC3M recipe: steps 1-4 end to end on CPU in a minute, on real images.

1. data: ``make_smoke_data`` writes a few hundred Fashion-MNIST images with captions in
   img2dataset's layout (shards, parquet, stats), then ``openclip_tau.key_index`` indexes them;
2. train: the command ``train.sh`` builds (``DRY_RUN=1``) for each loss, with the tiny model
   config ``cc3m-smoke-tiny`` and a few steps, run in this process (``openclip_tau.train.main``);
3. evaluate: ``evaluate.py`` on the local retrieval set instead of the downloads (and, with
   ``--imagenet``, OpenCLIP's ``--imagenet-val`` code path on a tiny image folder), with the
   comparison table;
4. analyse: ``analyze.py`` on the iSogCLR checkpoint.

The smoke run changes three iSogCLR settings, because its batch (32) and data set (400 pairs)
are tiny: the published rho 6.0 exceeds the log of the number of negatives (log 31 = 3.4),
which drives nearly every temperature to tau_min, so it uses rho 0.3 with tau_init 0.05; and
eta 0.1, so that 24 steps spread the temperatures visibly.

Usage:
    python -m recipes.cc3m.smoke --output /tmp/cc3m_smoke [--losses isogclr clip] [--imagenet]
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from recipes.cli_args import RawDescription, call
from tau_core.registry_source import constant, loss_options

# Every --loss of openclip_tau.train (its registry's loss_choices()), read without torch.
LossName = Literal[(*constant("openclip_tau", "UPSTREAM_LOSSES"), *loss_options("openclip_tau"))]

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOKE_LOSS_OPTIONS = {
    "isogclr": ["--tau-rho", "0.3", "--tau-init", "0.05", "--tau-eta", "0.1"],
    # The published rho 7 exceeds log(31) at the smoke batch as well (see iSogCLR's note).
    "tempnet": ["--tau-rho", "0.3"],
    "rgclg": ["--tau-rho", "0.3"],
}
SMOKE_ENV = {
    "MODEL": "cc3m-smoke-tiny",
    "GLOBAL_BATCH": "32",
    "EPOCHS": "2",
    "WARMUP": "2",
    "LR": "1e-3",
    "PRECISION": "fp32",
    "WORKERS": "1",
    "NPROC": "1",
    "NNODES": "1",
}


def train_command(loss: str, data: Path, logs: Path, extra: Sequence[str] = ()) -> list[str]:
    """The ``openclip_tau.train`` arguments that ``train.sh`` builds for the smoke settings."""
    env = dict(os.environ, **SMOKE_ENV, DATA=str(data), LOGS=str(logs), DRY_RUN="1")
    env["PYTHON"] = sys.executable
    env["NAME"] = f"smoke-{loss}"
    for name in ("TRAIN_NUM_SAMPLES", "WD", "SEED", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # train.sh's defaults, whatever the calling shell holds
    script = REPO_ROOT / "recipes" / "cc3m" / "train.sh"
    done = subprocess.run(
        ["bash", str(script), loss, *SMOKE_LOSS_OPTIONS.get(loss, []), *extra],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"train.sh {loss} failed: {done.stderr.strip()}")
    command = shlex.split(done.stdout)
    if command[1:3] != ["-m", "openclip_tau.train"]:
        raise RuntimeError(f"train.sh built an unexpected command: {done.stdout}")
    return command[3:]


def run_smoke(
    output: Path, losses: Sequence[LossName] = ("isogclr",), imagenet: bool = False
) -> dict[str, Any]:
    """Runs the four steps under ``output``; returns the paths of what they wrote.

    Args:
        output: folder for everything
        losses: losses to train (the analysis needs isogclr; tempnet adds the held-out analysis)
        imagenet: also run OpenCLIP's --imagenet-val path on a tiny folder (slow on CPU: it
            encodes 80 prompts for each of 1000 class names)
    """
    import torch

    from openclip_tau import key_index as key_index_cli
    from openclip_tau import train as train_cli
    from recipes.cc3m import analyze, evaluate
    from recipes.cc3m.make_smoke_data import make_smoke_data
    from recipes.cc3m.shards import brace_pattern, find_shards

    torch.set_num_threads(1)  # the smoke run shares small machines
    output.mkdir(parents=True, exist_ok=True)
    data = make_smoke_data(output / "data", imagenet_per_class=2 if imagenet else 0)
    shard_dir = Path(str(data["shards"]))
    key_index = shard_dir / "key_index.txt"
    key_index_cli.main(
        ["--shards", brace_pattern(find_shards(shard_dir)), "--output", str(key_index)]
    )

    logs = output / "logs"
    checkpoints = {}
    for loss in losses:
        args = train_command(loss, shard_dir, logs, ["--report-to", ""])
        train_cli.main(args)
        found = sorted((logs / f"smoke-{loss}" / "checkpoints").glob("epoch_*.pt"))
        if not found:
            raise RuntimeError(f"training with --loss {loss} wrote no checkpoint in {logs}")
        checkpoints[loss] = found[-1]

    eval_dir = output / "eval"
    for loss, checkpoint in checkpoints.items():
        spec = evaluate.parse_checkpoint(f"smoke-{loss}={checkpoint}", None)
        evaluate.evaluate_checkpoint(
            spec,
            eval_dir,
            imagenet_val=Path(str(data["imagenet_val"])) if imagenet else None,
            local_retrieval_dir=Path(str(data["retrieval"])),
            device="cpu",
            batch_size=32,
            workers=0,
            save_embeddings=True,
        )
    evaluate.build_table(eval_dir)

    summary: dict[str, Any] = {
        "data": data,
        "key_index": str(key_index),
        "checkpoints": {k: str(v) for k, v in checkpoints.items()},
        "evaluation": str(eval_dir / "comparison.md"),
    }
    if "isogclr" in checkpoints:
        analysis = analyze.analyze(checkpoints["isogclr"], key_index, output / "analysis", top=5)
        summary["analysis"] = str(output / "analysis")
        summary["tau_image"] = analysis["tau_image"]
        summary["tau_text"] = analysis["tau_text"]
    if "tempnet" in checkpoints:
        # TempNet's networks on the local retrieval pairs, which training never saw.
        analyze.analyze(
            checkpoints["tempnet"],
            key_index,
            output / "analysis_tempnet",
            top=5,
            held_out_embeddings=eval_dir / "embeddings" / "smoke-tempnet.pt",
        )
        summary["analysis_tempnet"] = str(output / "analysis_tempnet")
    (output / "smoke_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    head, _, tail = __doc__.partition("\n\n")
    options = dict(description=head, epilog=tail, formatter_class=RawDescription)
    summary = call(run_smoke, argv, prog="python -m recipes.cc3m.smoke", **options)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
