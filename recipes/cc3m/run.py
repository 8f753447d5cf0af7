"""Runs OpenCLIP training or evaluation with the recipe's model configs registered.

open_clip only knows the model configs in its own package folder, so the recipe's
``RN50-distilbert-size`` and ``cc3m-smoke-tiny`` must be registered in the process that builds
the model. This module does that and then hands every argument to

- ``openclip_tau.train`` (default): ``--loss {clip,siglip,sogclr,isogclr,dystress}``, the
  ``--tau-*`` options and any ``open_clip_train`` option;
- ``open_clip_train.main`` with ``--upstream`` (first argument): OpenCLIP's own entry point,
  used for zero-shot ImageNet evaluation (``--imagenet-val``).

Usage:
    python -m recipes.cc3m.run --loss isogclr --model RN50-distilbert-size --train-data ...
    torchrun --nproc_per_node 8 -m recipes.cc3m.run -- --loss isogclr ...
    python -m recipes.cc3m.run --upstream --model RN50-distilbert-size --pretrained CKPT \\
        --imagenet-val /data/imagenet/val --zeroshot-frequency 1
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from recipes.cc3m import register_model_configs


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":  # torchrun passes the separator through
        args = args[1:]
    if args and args[0] in ("-h", "--help") and len(args) == 1:
        print(__doc__)
    upstream = bool(args) and args[0] == "--upstream"
    if upstream:
        args = args[1:]
    register_model_configs()
    if upstream:
        from open_clip_train.main import main as openclip_main

        openclip_main(args)
    else:
        from openclip_tau.train import main as train_main

        train_main(args)


if __name__ == "__main__":
    main()
