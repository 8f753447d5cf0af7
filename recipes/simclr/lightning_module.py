"""The LightningModule and callback of ``python -m recipes.simclr.simclr_lightning``."""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
import torch
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor

from recipes.simclr.common import (
    PROJECTION_DIM,
    build_backbone,
    build_loss,
    loss_stats,
    save_loss_state,
    takes_index,
)
from tau_core import describe_state_memory

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
