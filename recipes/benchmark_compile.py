"""Eager against ``torch.compile``d time of one training step of every loss.

    python -m recipes.benchmark_compile                      # CPU, batch 256
    python -m recipes.benchmark_compile --device cuda --batch-size 1024 --dim 512

A step is the loss's forward (checks, state read, block math, state write) and its backward
into the features (and the temperature networks of RGCL-g and TempNet). The compiled step is
``torch.compile`` of the forward with the chosen backend (the backward runs through the
compiled graph's autograd); its first calls (compilation) are not timed.
Each time is the median over ``--repeats`` steps after ``--warmup`` steps.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch

import lightly_tau
import openclip_tau

NUM_SAMPLES = 100_000


def losses(dim: int) -> dict[str, tuple[torch.nn.Module, bool]]:
    """Each loss with its defaults, and whether it is image-text."""
    return {
        "SogCLRLoss": (lightly_tau.SogCLRLoss(NUM_SAMPLES), False),
        "ISogCLRLoss": (lightly_tau.ISogCLRLoss(NUM_SAMPLES), False),
        "RGCLGLoss": (lightly_tau.RGCLGLoss(NUM_SAMPLES), False),
        "TempNetLoss": (lightly_tau.TempNetLoss(NUM_SAMPLES, dim=dim), False),
        "DySTreSSLoss": (lightly_tau.DySTreSSLoss(), False),
        "SogCLRClipLoss": (openclip_tau.SogCLRClipLoss(NUM_SAMPLES), True),
        "ISogCLRClipLoss": (openclip_tau.ISogCLRClipLoss(NUM_SAMPLES), True),
        "RGCLGClipLoss": (openclip_tau.RGCLGClipLoss(NUM_SAMPLES), True),
        "TempNetClipLoss": (openclip_tau.TempNetClipLoss(NUM_SAMPLES, dim=dim), True),
        "DySTreSSClipLoss": (openclip_tau.DySTreSSClipLoss(), True),
    }


def make_forward(loss: torch.nn.Module, image_text: bool) -> Callable[..., torch.Tensor]:
    def forward(a: torch.Tensor, b: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return loss(a, b, index=index) if image_text else loss(a, b, index)

    return forward


def time_step(forward: Callable, args: argparse.Namespace, device: torch.device) -> float:
    """Median seconds of one step (``forward``, then the backward pass), after the warm-up."""
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(args.warmup + args.repeats):
        a = torch.randn(args.batch_size, args.dim, generator=g).to(device).requires_grad_()
        b = torch.randn(args.batch_size, args.dim, generator=g).to(device).requires_grad_()
        index = torch.randperm(NUM_SAMPLES, generator=g)[: args.batch_size].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        forward(a, b, index).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--losses", nargs="*", default=None, help="names (default: all)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, device {device}, batch {args.batch_size}, dim {args.dim}, "
        f"backend {args.backend}"
    )
    print(f"{'loss':<18} {'eager ms':>10} {'compiled ms':>12} {'speed-up':>9}")
    for name, (loss, image_text) in losses(args.dim).items():
        if args.losses and name not in args.losses:
            continue
        torch._dynamo.reset()
        eager = loss.to(device)
        compiled = copy.deepcopy(eager)
        eager_s = time_step(make_forward(eager, image_text), args, device)
        compiled_forward = torch.compile(make_forward(compiled, image_text), backend=args.backend)
        compiled_s = time_step(compiled_forward, args, device)
        print(
            f"{name:<18} {eager_s * 1e3:>10.2f} {compiled_s * 1e3:>12.2f} "
            f"{eager_s / compiled_s:>8.2f}x"
        )


if __name__ == "__main__":
    main()
