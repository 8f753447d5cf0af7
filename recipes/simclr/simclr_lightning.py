"""Lightly's SimCLR example (PyTorch Lightning) with the loss chosen by ``--loss``.

Lightly's ``examples/pytorch_lightning/simclr.py`` (and its ``pytorch_lightning_distributed``
variant for several devices) on Fashion-MNIST. Against that example only two things change for
the temperature-aware losses:

1. the loss is built with the dataset size (``build_loss``; for ``isogclr`` that is
   ``ISogCLRLoss(num_samples=len(dataset), gather_distributed=True)`` on several devices);
2. the dataset is wrapped in ``lightly_tau.IndexedDataset`` and ``training_step`` passes the
   batch's indices: ``self.criterion(z0, z1, index)``.

The stateful losses' per-sample tables are not module buffers, so DDP's buffer broadcast from
rank 0 leaves them alone; with ``gather_distributed=True`` every rank applies the state update
of the whole global batch and the tables stay identical on all ranks. They are saved in the
Lightning checkpoint. ``on_train_epoch_start`` advances the gamma schedule.

Run::

    python -m recipes.simclr.simclr_lightning --loss isogclr --backbone convnet \
        --num-samples-limit 2048 --batch-size 128 --max-steps 20
    # two processes on a CPU (gloo):
    python -m recipes.simclr.simclr_lightning --loss isogclr --devices 2 --strategy ddp ...
    tensorboard --logdir logs
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from recipes.simclr.cli import LightningOptions, parse

if TYPE_CHECKING:
    from recipes.simclr.common import RunResult


def main(argv: Optional[Sequence[str]] = None) -> RunResult:
    """Trains SimCLR with Lightning; returns this process's loss, step losses, visited indices."""
    parser, args, options = parse(
        argv,
        "SimCLR on Fashion-MNIST (Lightly's example, PyTorch Lightning) with NT-Xent, SogCLR, "
        "iSogCLR or DySTreSS.",
        LightningOptions,
    )
    if args.state_layout == "sharded" and (args.devices < 2 or args.loss in ("ntxent", "dystress")):
        parser.error(
            "--state-layout sharded splits the per-sample tables of a stateful loss (sogclr, "
            "isogclr, rgclg, tempnet) over several processes: use --devices 2 or more."
        )
    # The heavy imports come after parsing, so --help and bad flags answer at once.
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.loggers import TensorBoardLogger

    from lightly_tau import TrainedTemperature
    from recipes.seeds import SeededShuffleSampler
    from recipes.simclr.common import (
        RunResult,
        fashion_mnist_dataset,
        format_stats,
        loss_stats,
        simclr_transform,
    )
    from recipes.simclr.lightning_module import SaveLossState, SimCLR
    from tau_core import TrainedTemperatureMixin

    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    pl.seed_everything(args.seed, workers=True, verbose=False)

    transform = simclr_transform(args.input_size)
    dataset = fashion_mnist_dataset(args.data_root, transform, args.num_samples_limit)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        # Each epoch's order from its own seed derived from (--seed, epoch), split over the
        # devices (Lightning's DistributedSampler would use seed + epoch: overlapping seeds).
        sampler=SeededShuffleSampler(dataset, args.seed),
        drop_last=True,
        num_workers=args.num_workers,
    )
    if len(dataset) < args.batch_size * args.devices:
        parser.error(
            f"--batch-size {args.batch_size} on {args.devices} device(s) needs at least "
            f"{args.batch_size * args.devices} images; the dataset has {len(dataset)}."
        )

    distributed = args.devices > 1 and not args.no_gather_distributed
    model = SimCLR(
        backbone=args.backbone,
        loss=args.loss,
        num_samples=len(dataset),
        loss_options=options,
        gather_distributed=distributed,
        lr=args.lr,
        state_layout=args.state_layout,
    )
    accelerator = args.accelerator or ("gpu" if torch.cuda.is_available() else "cpu")
    callbacks: list[pl.Callback] = []
    if args.loss_state_dir is not None:
        callbacks.append(SaveLossState(args.loss_state_dir))
    if isinstance(model.criterion, TrainedTemperatureMixin):
        callbacks.append(TrainedTemperature())  # lightly-tau: the temperature's own AdamW
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        max_steps=-1 if args.max_steps is None else args.max_steps,
        devices=args.devices,
        accelerator=accelerator,
        strategy=args.strategy,
        # SyncBatchNorm needs GPUs; Lightly's distributed example turns it on there.
        sync_batchnorm=distributed and accelerator == "gpu",
        use_distributed_sampler=False,
        logger=TensorBoardLogger(args.log_dir, name=f"simclr_{args.loss}"),
        log_every_n_steps=args.log_every,
        callbacks=callbacks,
    )
    trainer.fit(model=model, train_dataloaders=dataloader)

    result = RunResult(
        model.criterion,
        losses=model.step_losses,
        stats={k: v.item() for k, v in loss_stats(model.criterion).items()},
        visited=model.visited,
    )
    if trainer.is_global_zero and result.losses:
        print(
            f"--loss {args.loss}: {len(result.losses)} steps, last loss "
            f"{result.losses[-1]:.5f}  {format_stats(result.stats)}"
        )
    return result


if __name__ == "__main__":
    main()
