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

from typing import TYPE_CHECKING, Any, Optional, Sequence

from recipes.simclr.cli import PyTorchOptions, parse

if TYPE_CHECKING:
    from recipes.simclr.common import RunResult


def _train(
    args: Any, model: Any, criterion: Any, dataloader: Any, device: str, visited: Any
) -> list[float]:
    """Lightly's training loop, with the batch's indices passed to the losses that take them;
    marks the visited samples and returns the loss of every step."""
    import torch

    from recipes.simclr.common import format_stats, loss_stats, takes_index, temperature_optimizer

    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    # RGCL-g and TempNet: the temperature's own AdamW, with its published schedule.
    tau_optimizer = temperature_optimizer(criterion)
    step_losses: list[float] = []
    step = 0
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

    return step_losses


def main(argv: Optional[Sequence[str]] = None) -> RunResult:
    """Trains SimCLR and returns the loss, the per-step losses and the visited indices."""
    parser, args, options = parse(
        argv,
        "SimCLR on Fashion-MNIST (Lightly's example, pure PyTorch) with NT-Xent, SogCLR, "
        "iSogCLR or DySTreSS.",
        PyTorchOptions,
    )
    # The heavy imports come after parsing, so --help and bad flags answer at once.
    import torch

    from recipes.simclr.common import (
        RunResult,
        SimCLR,
        build_backbone,
        build_loss,
        fashion_mnist_dataset,
        loss_stats,
        save_loss_state,
        simclr_transform,
        takes_index,
    )
    from tau_core import describe_state_memory

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

    visited = torch.zeros(len(dataset), dtype=torch.bool)
    print(f"Starting Training: --loss {args.loss}, {len(dataset)} images, {device}")
    if takes_index(criterion):
        print(describe_state_memory(criterion, 1))
    step_losses = _train(args, model, criterion, dataloader, device, visited)

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
