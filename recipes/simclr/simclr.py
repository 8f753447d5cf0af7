"""Lightly's SimCLR example (pure PyTorch) with the loss chosen by ``--loss``.

Lightly's ``examples/pytorch/simclr.py`` on Fashion-MNIST. Against that example only two things
change for the temperature-aware losses:

1. the loss is built with the dataset size (``build_loss``; for ``sogclr`` and ``isogclr`` that
   is ``SogCLRLoss(num_samples=len(dataset))`` / ``ISogCLRLoss(num_samples=len(dataset))``);
2. the dataset is wrapped in ``lightly_tau.IndexedDataset`` and the loss gets the batch's
   indices: ``criterion(z0, z1, index)``.

Stateful losses also get ``criterion.set_epoch(epoch)`` for their gamma schedule.

Run (a few seconds on a CPU)::

    python -m recipes.simclr.simclr --loss isogclr --backbone convnet \
        --num-samples-limit 2048 --batch-size 128 --max-steps 20
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch
from lightly.models.modules import SimCLRProjectionHead
from torch import nn

from recipes.simclr.common import (
    PROJECTION_DIM,
    RunResult,
    add_common_arguments,
    build_backbone,
    build_loss,
    check_run_arguments,
    fashion_mnist_dataset,
    format_stats,
    loss_options,
    loss_stats,
    save_loss_state,
    simclr_transform,
    takes_index,
    temperature_optimizer,
)
from tau_core import describe_state_memory


class SimCLR(nn.Module):
    """Backbone and SimCLR projection head, as in Lightly's example."""

    def __init__(self, backbone: nn.Module, num_features: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(num_features, 512, PROJECTION_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone(x).flatten(start_dim=1)
        z = self.projection_head(x)
        return z


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="SimCLR on Fashion-MNIST (Lightly's example, pure PyTorch) with NT-Xent, "
        "SogCLR, iSogCLR or DySTreSS.",
    )
    add_common_arguments(parser)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--log-every", type=int, default=10, help="print every N steps")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> RunResult:
    """Trains SimCLR and returns the loss, the per-step losses and the visited indices."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_run_arguments(args, parser)
    options = loss_options(args, parser)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)

    backbone, num_features = build_backbone(args.backbone)
    model = SimCLR(backbone, num_features)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)

    transform = simclr_transform(args.input_size)
    # IndexedDataset: batches are ([x0, x1], target, index).
    dataset = fashion_mnist_dataset(args.data_root, transform, args.num_samples_limit)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    if len(dataloader) == 0:
        parser.error(
            f"--batch-size {args.batch_size} is larger than the dataset ({len(dataset)} images)."
        )

    # The swap: NTXentLoss() in Lightly's example; the stateful losses need len(dataset).
    criterion = build_loss(args.loss, num_samples=len(dataset), **options).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    # RGCL-g and TempNet: the temperature's own AdamW, with its published schedule.
    tau_optimizer = temperature_optimizer(criterion)

    visited = torch.zeros(len(dataset), dtype=torch.bool)
    step_losses: list[float] = []
    step = 0
    print(f"Starting Training: --loss {args.loss}, {len(dataset)} images, {device}")
    if takes_index(criterion):
        print(describe_state_memory(criterion, 1))
    for epoch in range(args.epochs):
        if hasattr(criterion, "set_epoch"):
            criterion.set_epoch(epoch)
        # Kept on the device during the epoch: no host synchronisation per step.
        epoch_losses: list[torch.Tensor] = []
        for batch in dataloader:
            (x0, x1), _, index = batch
            x0 = x0.to(device)
            x1 = x1.to(device)
            z0 = model(x0)
            z1 = model(x1)
            if takes_index(criterion):
                loss = criterion(z0, z1, index.to(device))
            else:
                loss = criterion(z0, z1)
            epoch_losses.append(loss.detach())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if tau_optimizer is not None:
                tau_optimizer.step()
                tau_optimizer.zero_grad()

            step += 1
            visited[index] = True
            if step % args.log_every == 0:
                stats = {k: v.item() for k, v in loss_stats(criterion).items()}
                print(f"step {step:>5}  loss {loss.item():.5f}  {format_stats(stats)}")
            if args.max_steps is not None and step >= args.max_steps:
                break
        step_losses += torch.stack(epoch_losses).tolist()
        avg_loss = sum(step_losses[-len(epoch_losses) :]) / len(epoch_losses)
        print(f"epoch: {epoch:>02}, loss: {avg_loss:.5f}")
        if args.max_steps is not None and step >= args.max_steps:
            break

    if args.loss_state_dir is not None:
        path = save_loss_state(args.loss_state_dir, 0, criterion, visited)
        print(f"Saved the loss state to {path}")
    return RunResult(
        criterion,
        losses=step_losses,
        stats={k: v.item() for k, v in loss_stats(criterion).items()},
        visited=visited,
    )


if __name__ == "__main__":
    main()
