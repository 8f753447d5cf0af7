"""Zero-shot ImageNet of a checkpoint through OpenCLIP's own ``--imagenet-val`` option.

Runs ``python -m openclip_tau.train --loss clip`` (upstream ``open_clip_train`` unchanged) with
the given arguments, which evaluates and exits when no training data is given. One upstream
helper is replaced for the run: ``open_clip_train.zero_shot.accuracy`` (3.3.0) converts a
1-element array with ``float()``, which NumPy >= 2.3 refuses ("only 0-dimensional arrays can be
converted"); the replacement computes the same counts.

Usage (evaluate.py builds this command):
    python -m recipes.cc3m.openclip_zero_shot --model RN50-distilbert-size \\
        --pretrained logs/cc3m-isogclr/checkpoints/epoch_30.pt --imagenet-val /data/imagenet/val \\
        --zeroshot-frequency 1 --logs results/openclip_logs --name imagenet-isogclr
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch

from recipes.cc3m import MODEL_CONFIG_DIR


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """Number of samples whose target is among the top-k logits, for each k (upstream's result)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum().item()) for k in topk]


def main(argv: Optional[Sequence[str]] = None) -> None:
    import open_clip_train.zero_shot as upstream_zero_shot

    from openclip_tau.train import cli

    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(__doc__)
        return
    upstream_zero_shot.accuracy = accuracy  # looked up at call time by upstream's run()
    sys.argv = [sys.argv[0], "--loss", "clip", "--add-model-config", str(MODEL_CONFIG_DIR), *args]
    cli()


if __name__ == "__main__":
    main()
