"""PyTorch Lightning callbacks: the trained temperature's own optimizer, sharded-state checkpoints.

``Trainer(callbacks=[TrainedTemperature()])`` gives RGCL-g's and TempNet's temperature its own
AdamW beside the model's optimizer; ``Trainer(callbacks=[ShardedStateCheckpoint()])`` makes a
``state_layout="sharded"`` loss resumable with ``ckpt_path=``; ``SeedEveryEpoch(seed)`` makes a
resumed run draw the random numbers of the uninterrupted one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from torch import nn

from tau_core import (
    ShardedPerSampleState,
    TrainedTemperatureMixin,
    load_state_shards,
    save_state_shards,
)
from tau_core.adapter import GlobalContrastiveLoss, derive_seed

SHARDS_KEY = "lightly_tau_state_shards"  # checkpoint entry: {loss name: shard folder}


def trained_temperature_losses(module: nn.Module) -> dict[str, TrainedTemperatureMixin]:
    """Every loss of ``module`` (itself included) whose temperature is trained, by name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, TrainedTemperatureMixin)}


class TrainedTemperature(pl.Callback):
    """Trains the temperature of RGCL-g and TempNet losses with their own optimizer.

    The model keeps the optimizer ``configure_optimizers`` returns (Lightly's SGD, LARS, ...);
    each loss of the LightningModule with a trained temperature (``RGCLGLoss``, ``TempNetLoss``
    and the image-text twins) gets the AdamW of ``loss.optimizer()`` (its published learning
    rate and schedule, no weight decay, RGCL-g's clamp). At every step of the model's optimizer
    (after gradient accumulation, as Lightning steps it) the callback steps the temperature's
    AdamW on the gradient just computed and sets that gradient to None, so the model's
    optimizer skips those parameters even when its groups hold them (``SGD(self.parameters())``
    of a module that has the loss as an attribute). At the start of every training epoch it
    calls ``loss.set_epoch(epoch)`` (TempNet's learning rate decays per epoch). The AdamW's state
    is saved in the Lightning checkpoint and restored on resume (``ckpt_path=``).

    Under mixed precision with a gradient scaler the temperature's gradient is unscaled first,
    and the step is skipped where it is not finite (as the scaler skips the model's).

    Args:
        set_epoch: Call ``set_epoch(trainer.current_epoch)`` on the losses at every epoch start.
            Default True.

    Examples:
        >>> trainer = pl.Trainer(max_epochs=10, callbacks=[TrainedTemperature()])
        >>> trainer.fit(model, dataloader)  # model.criterion = RGCLGLoss(len(dataset))
    """

    def __init__(self, set_epoch: bool = True) -> None:
        if not isinstance(set_epoch, bool):
            raise ValueError(f"set_epoch must be True or False, got {set_epoch!r}.")
        self.set_epoch = set_epoch
        self.losses: dict[str, TrainedTemperatureMixin] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self._loaded: dict[str, Any] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.losses = trained_temperature_losses(pl_module)
        if not self.losses:
            raise ValueError(
                "TrainedTemperature: the LightningModule has no loss with a trained temperature "
                "(RGCLGLoss, TempNetLoss, RGCLGClipLoss, TempNetClipLoss) among its modules; "
                "remove the callback or make the loss an attribute of the module."
            )

    def _optimizer(self, name: str) -> torch.optim.Optimizer:
        if name not in self.optimizers:
            optimizer = self.losses[name].optimizer()
            if name in self._loaded:
                optimizer.load_state_dict(self._loaded.pop(name))
            self.optimizers[name] = optimizer
        return self.optimizers[name]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name in self.losses:
            self._optimizer(name)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.set_epoch:
            for loss in self.losses.values():
                loss.set_epoch(trainer.current_epoch)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        unscaled = {id(p) for g in getattr(optimizer, "param_groups", []) for p in g["params"]}
        for name, loss in self.losses.items():
            params = [p for p in loss.temperature_parameters() if p.grad is not None]
            if not params:  # already stepped at this step (several optimizers), or unused
                continue
            if scaler is not None and scaler.is_enabled():
                # The scaler unscaled the model optimizer's gradients only.
                inverse = 1.0 / scaler.get_scale()
                for p in params:
                    if id(p) not in unscaled:
                        p.grad.mul_(inverse)
                finite = all(bool(torch.isfinite(p.grad).all()) for p in params)
            else:
                finite = True
            own = self._optimizer(name)
            if finite:
                own.step()
            own.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        state = {name: opt.state_dict() for name, opt in self.optimizers.items()}
        return {"optimizers": {**self._loaded, **state}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, opt_state in state_dict.get("optimizers", {}).items():
            if name in self.optimizers:
                self.optimizers[name].load_state_dict(opt_state)
            else:
                self._loaded[name] = opt_state


def sharded_losses(module: nn.Module) -> dict[str, GlobalContrastiveLoss]:
    """Every loss of ``module`` whose per-sample state is sharded, by module name."""
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, GlobalContrastiveLoss) and isinstance(m.state, ShardedPerSampleState)
    }


class ShardedStateCheckpoint(pl.Callback):
    """Saves and resumes the per-sample state of ``state_layout="sharded"`` losses in Lightning.

    Lightning writes the checkpoint on rank 0 and, on resume, loads it into every rank; a
    sharded state's own ``state_dict`` holds one rank's rows only. With this callback, every
    checkpoint Lightning saves also writes each rank's rows with
    :func:`tau_core.save_state_shards` into ``<dirpath>/loss-state-step<global_step>/<loss>``
    (one file per rank and an ``index.json``) and names that folder in the checkpoint. On
    ``trainer.fit(..., ckpt_path=...)`` the rows in the module's state dict are ignored and every
    rank loads its own from the folder with :func:`tau_core.load_state_shards` (also into another
    number of processes, or the replicated layout).

    Args:
        dirpath: Folder of the shard folders. Default: the ``ModelCheckpoint``'s ``dirpath``
            (else ``trainer.default_root_dir``). It must be reachable from every rank.

    Examples:
        >>> trainer = pl.Trainer(strategy="ddp", devices=2, callbacks=[ShardedStateCheckpoint()])
        >>> trainer.fit(model, dataloader, ckpt_path="last")
    """

    def __init__(self, dirpath: Optional[str] = None) -> None:
        self.dirpath = dirpath
        self._saved: dict[int, dict[str, str]] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The rows of a checkpoint's module state dict are rank 0's: every rank ignores them and
        # loads its own from the shard folder (on_load_checkpoint).
        for loss in sharded_losses(pl_module).values():
            loss.state.rows_from_state_dict = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for loss in sharded_losses(pl_module).values():
            loss.state.rows_from_state_dict = True

    def _root(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        callback = trainer.checkpoint_callback
        dirpath = getattr(callback, "dirpath", None)
        return Path(dirpath if dirpath else trainer.default_root_dir)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Called on every rank (Lightning builds the checkpoint everywhere, rank 0 writes it).
        step = trainer.global_step
        if step not in self._saved:  # "last" and a top-k checkpoint of the same step share it
            folders = {}
            for name, loss in sharded_losses(pl_module).items():
                folder = self._root(trainer) / f"loss-state-step{step}" / (name or "loss")
                save_state_shards(loss, folder)
                folders[name] = str(folder.resolve())
            self._saved = {step: folders}
        checkpoint[SHARDS_KEY] = dict(self._saved[step])

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        losses = sharded_losses(pl_module)
        folders = checkpoint.get(SHARDS_KEY)
        if losses and folders is None:
            raise ValueError(
                "ShardedStateCheckpoint: this checkpoint has no per-sample state folders (it was "
                "saved without the callback), so the sharded state cannot be resumed."
            )
        for name, loss in losses.items():
            if name not in folders:
                raise ValueError(
                    f"ShardedStateCheckpoint: the checkpoint names no state folder for the loss "
                    f"'{name}' (it has {sorted(folders)})."
                )
            load_state_shards(loss, folders[name])


class SeedEveryEpoch(pl.Callback):
    """Reseeds Python's, NumPy's and torch's generators before every training epoch.

    Lightning does not checkpoint the global generators, so a run resumed from a checkpoint
    draws other data orders and augmentations than the uninterrupted run. This callback seeds
    them from a hash of ``(seed, epoch, rank)`` (not ``seed + epoch``, so two seeds never share
    an epoch's draws) just before the epoch's data loader iterator is created: at the start of
    ``fit`` for the first (or resumed) epoch and at the end of every training epoch for the next
    one. Every draw of an epoch then depends only on ``(seed, epoch, rank)``.

    A resumed run (``trainer.fit(..., ckpt_path=...)`` from a checkpoint saved at an epoch's end)
    is bit-identical to the uninterrupted one, tables, weights and optimizer states, with:
    ``pl.seed_everything(seed)`` before the model is built, this callback, a data loader whose
    workers are not persistent (``num_workers=0``, or ``persistent_workers=False``), a loss
    whose random draws are its own (TempNet's dropout is), ``TrainedTemperature`` for a trained
    temperature and deterministic kernels (``Trainer(deterministic=True)`` on a GPU). A
    checkpoint saved in the middle of an epoch resumes that epoch with a new iterator (Lightning
    does not restore a data loader's position), so it is not exact.

    Args:
        seed: The run's seed (any integer).

    Examples:
        >>> pl.seed_everything(0)
        >>> trainer = pl.Trainer(callbacks=[TrainedTemperature(), SeedEveryEpoch(0)])
    """

    def __init__(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        self.seed = seed
        self._resumed_epoch: Optional[int] = None

    def _reseed(self, trainer: pl.Trainer, epoch: int) -> None:
        value = derive_seed(self.seed, epoch, trainer.global_rank)
        random.seed(value)
        torch.manual_seed(value)
        try:
            import numpy
        except ImportError:  # pragma: no cover - NumPy comes with Lightning
            return
        numpy.random.seed(value % 2**32)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restores the loops' progress after this hook: a resumed run's epoch comes
        # from the checkpoint (on_load_checkpoint, called before the first iterator exists).
        epoch = self._resumed_epoch if self._resumed_epoch is not None else trainer.current_epoch
        self._reseed(trainer, epoch)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        try:
            progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]
            self._resumed_epoch = int(progress["processed"])  # epochs whose training ended
        except (KeyError, TypeError):
            self._resumed_epoch = int(checkpoint.get("epoch", 0))
        self._reseed(trainer, self._resumed_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reseed(trainer, trainer.current_epoch + 1)
