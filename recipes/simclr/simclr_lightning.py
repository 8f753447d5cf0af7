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

import argparse
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
from lightly.models.modules import SimCLRProjectionHead
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor

from lightly_tau import TrainedTemperature
from recipes.seeds import SeededShuffleSampler
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
)
from tau_core import TrainedTemperatureMixin, describe_state_memory

# Shown beside the loss on the progress bar; every statistic goes to TensorBoard.
PROGRESS_BAR_STATS = ("tau_mean", "tau_positive_mean")


class SimCLR(pl.LightningModule):
    """Backbone, SimCLR projection head and the chosen loss, as in Lightly's example.

    Args:
        backbone: ``resnet18`` or ``convnet`` (see ``build_backbone``).
        loss: ``ntxent``, ``sogclr``, ``isogclr`` or ``dystress``.
        num_samples: ``len(dataset)``, the size of the stateful losses' tables.
        loss_options: Hyperparameters of the loss.
        gather_distributed: Gather negatives and state updates across processes (several
            devices).
        lr: SGD learning rate.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        loss: str = "ntxent",
        num_samples: int = 60_000,
        loss_options: Optional[dict[str, Any]] = None,
        gather_distributed: bool = False,
        lr: float = 0.06,
        state_layout: str = "replicated",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone, num_features = build_backbone(backbone)
        self.projection_head = SimCLRProjectionHead(num_features, 512, PROJECTION_DIM)
        # The swap: NTXentLoss() in Lightly's example.
        self.criterion = build_loss(
            loss, num_samples, gather_distributed, state_layout, **(loss_options or {})
        )
        self.lr = lr
        # Indices this process trained on, and each step's loss (on the host, not buffers:
        # DDP would overwrite buffers with rank 0's).
        self.visited = torch.zeros(num_samples, dtype=torch.bool)
        self.step_losses: list[float] = []
        self._epoch_losses: list[Tensor] = []  # on the device until the epoch ends

    def forward(self, x: Tensor) -> Tensor:
        x = self.backbone(x).flatten(start_dim=1)
        z = self.projection_head(x)
        return z

    def on_fit_start(self) -> None:
        if self.global_rank == 0 and takes_index(self.criterion):
            print(describe_state_memory(self.criterion, self.trainer.world_size))

    def on_train_epoch_start(self) -> None:
        if hasattr(self.criterion, "set_epoch"):
            self.criterion.set_epoch(self.current_epoch)

    def training_step(self, batch: Any, batch_index: int) -> Tensor:
        (x0, x1), _, index = batch
        z0 = self.forward(x0)
        z1 = self.forward(x1)
        if takes_index(self.criterion):
            loss = self.criterion(z0, z1, index)
        else:
            loss = self.criterion(z0, z1)
        self.log("train/loss", loss, prog_bar=True)
        stats = loss_stats(self.criterion)
        # Each rank's own batch statistics; the logger writes rank 0's (no per-step all-reduce).
        for name, value in stats.items():
            self.log(f"train/{name}", value, prog_bar=name in PROGRESS_BAR_STATS)
        self.visited[index.cpu()] = True
        self._epoch_losses.append(loss.detach())
        return loss

    def on_train_epoch_end(self) -> None:
        self._move_losses_to_host()

    def on_train_end(self) -> None:
        self._move_losses_to_host()

    def _move_losses_to_host(self) -> None:
        if self._epoch_losses:
            self.step_losses += torch.stack(self._epoch_losses).tolist()
            self._epoch_losses.clear()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Lightly's example, unchanged: a trained temperature (RGCL-g, TempNet) is stepped by its
        # own AdamW in the TrainedTemperature callback, and the SGD skips its parameters.
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class SaveLossState(pl.Callback):
    """Saves every rank's loss state and visited indices when training ends."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        save_loss_state(self.directory, trainer.global_rank, pl_module.criterion, pl_module.visited)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="SimCLR on Fashion-MNIST (Lightly's example, PyTorch Lightning) with "
        "NT-Xent, SogCLR, iSogCLR or DySTreSS.",
    )
    add_common_arguments(parser)
    parser.add_argument("--accelerator", default=None, help="default: gpu if available, else cpu")
    parser.add_argument(
        "--devices",
        type=int,
        default=1,
        help="number of processes; more than 1 gathers negatives and state updates",
    )
    parser.add_argument(
        "--strategy", default="auto", help="Lightning strategy, e.g. ddp (default: auto)"
    )
    parser.add_argument(
        "--no-gather-distributed",
        action="store_true",
        help="with several devices, take negatives from each process's own batch only "
        "(the per-sample state is still synchronised across processes)",
    )
    parser.add_argument(
        "--state-layout",
        choices=["replicated", "sharded"],
        default="replicated",
        help="per-sample tables of the stateful losses: every process holds every row "
        "(replicated, default) or process r holds rows i %% devices == r (sharded)",
    )
    parser.add_argument("--log-dir", default="logs", help="TensorBoard and checkpoint folder")
    parser.add_argument("--log-every", type=int, default=10, help="log every N steps")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> RunResult:
    """Trains SimCLR with Lightning; returns this process's loss, step losses, visited indices."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_run_arguments(args, parser)
    if args.devices < 1:
        parser.error(f"--devices must be >= 1, got {args.devices}.")
    if args.state_layout == "sharded" and (args.devices < 2 or args.loss in ("ntxent", "dystress")):
        parser.error(
            "--state-layout sharded splits the per-sample tables of a stateful loss (sogclr, "
            "isogclr, rgclg, tempnet) over several processes: use --devices 2 or more."
        )
    options = loss_options(args, parser)
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
