"""One SimCLR run per loss with PyTorch Lightning: the losses, the module, the training loop.

The losses, at equal budget, come from one registry (:data:`LOSS_REGISTRY`): Lightly's
``NTXentLoss`` with a fixed temperature, the same with the cosine temperature schedule of Kukleva
et al. (ICLR 2023), Lightly's ``MACLLoss`` (model-aware temperature) and ``DCLLoss``, and
``lightly_tau``'s ``SogCLRLoss``, ``ISogCLRLoss`` and ``DySTreSSLoss``. The stateful losses get each sample's dataset index from
``IndexedDataset`` and ``set_epoch`` at every epoch. Lightning runs the loop, so the same code
trains on a CPU, a GPU, or several GPUs with ``strategy="ddp"`` (the losses then gather
negatives and state updates across ranks).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from lightly.utils.lars import LARS
from lightly.utils.scheduler import CosineWarmupScheduler
from pytorch_lightning.callbacks import TQDMProgressBar
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics import MaxMetric, MeanMetric, MinMetric

from lightly_tau import (
    IndexedDataset,
)
from recipes.longtail.augment import (
    AugmentSettings,
    BatchSimCLRAugment,
    ImageTensors,
    LightlyViews,
)
from recipes.longtail.data import LongTailData
from recipes.longtail.evaluate import (
    evaluate_features,
    extract_features,
    temperature_by_class,
)
from recipes.longtail.losses import (  # noqa: F401  (re-exported: the recipe's loss names)
    DEFAULT_LOSSES,
    LOSS_LABELS,
    LOSS_REGISTRY,
    LOSSES,
    LossSettings,
    LossSpec,
    cosine_temperature,
)
from recipes.longtail.models import SimCLRModel
from recipes.longtail.names import OPTIMIZERS  # noqa: F401
from recipes.seeds import SeededShuffleSampler
from recipes.temperature_analysis import knn_density


@dataclass
class TrainSettings:
    """Model, optimisation and hardware settings shared by every run."""

    epochs: int = 12
    batch_size: int = 256
    backbone: str = "convnet"
    hidden_dim: int = 512
    output_dim: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_epochs: int = 0
    precision: str = "bf16"
    augment: str = "batched"
    workers: int = 0
    accelerator: str = "cpu"
    devices: int = 1
    strategy: str = "auto"
    knn_k: int = 20
    knn_t: float = 0.1
    probe_epochs: int = 100
    # Cap on optimizer steps per epoch (smoke runs); None trains on every batch.
    steps_per_epoch: Optional[int] = None
    progress: bool = True
    # Line of the progress bar, so that runs side by side do not overwrite each other.
    progress_position: int = 0
    # Neighbours of the local-density measure (mean similarity of the k nearest training images).
    density_k: int = 20


class TemperatureLoss(nn.Module):
    """One loss of :data:`LOSS_REGISTRY` behind a common interface for the training loop.

    ``forward(z0, z1, index)`` returns the loss; afterwards ``tau_batch`` is the mean temperature
    applied to the logits of the batch's negatives (for DySTreSS, of its negative pairs, and
    ``tau_positive`` of its positive pairs; for MACL, its model-aware temperature).
    """

    def __init__(
        self,
        name: str,
        settings: LossSettings,
        num_samples: int,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if name not in LOSS_REGISTRY:
            raise ValueError(f"loss must be one of {LOSSES}, got {name!r}.")
        self.name = name
        self.spec = LOSS_REGISTRY[name]
        self.settings = settings
        self.loss: nn.Module = self.spec.build(settings, num_samples, gather_distributed)
        self.tau_batch: Tensor = torch.tensor(math.nan)
        self.tau_positive: Optional[Tensor] = None

    @property
    def uses_index(self) -> bool:
        return self.spec.uses_index

    def cosine_temperature(self, step: int, steps_per_epoch: int, max_steps: int) -> float:
        """Kukleva et al.'s schedule, ``tau_max`` at step 0, ``tau_min`` half a period later."""
        return cosine_temperature(self.settings, step, steps_per_epoch, max_steps)

    def before_step(self, step: int, steps_per_epoch: int, max_steps: int) -> None:
        if self.spec.before_step is not None:
            self.spec.before_step(self.loss, self.settings, step, steps_per_epoch, max_steps)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loss, "set_epoch"):
            self.loss.set_epoch(epoch)

    def forward(self, z0: Tensor, z1: Tensor, index: Tensor) -> Tensor:
        value = self.loss(z0, z1, index) if self.uses_index else self.loss(z0, z1)
        tau, positive = self.spec.batch_temperature(self.loss, z0, z1)
        self.tau_batch = torch.as_tensor(tau).detach()
        self.tau_positive = None if positive is None else torch.as_tensor(positive).detach()
        return value

    def sample_temperatures(self) -> Optional[Tensor]:
        """The learned temperature of every training sample (iSogCLR), else None."""
        return self.loss.tau if self.spec.per_sample else None  # type: ignore[return-value]


class RunProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, labelled with the run (loss and seed) and its epoch."""

    def __init__(self, label: str, refresh_rate: int = 5, position: int = 0) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=position)
        self.label = label

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(
            f"{self.label} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        )


class SimCLRRun(pl.LightningModule):
    """SimCLR training with one loss; keeps a per-epoch history of loss and temperatures."""

    def __init__(
        self,
        model: SimCLRModel,
        loss: TemperatureLoss,
        settings: TrainSettings,
        augment: Optional[BatchSimCLRAugment],
        data: LongTailData,
    ) -> None:
        super().__init__()
        self.model = model
        self.criterion = loss
        self.settings = settings
        self.augment = augment
        self.data = data
        self.history: list[dict] = []
        self.tau_optimizer: Optional[torch.optim.Optimizer] = None
        # Running epoch means of the loss and the batch temperatures, and the lowest and highest
        # batch temperature of the epoch (this process's batches).
        self.epoch_means = nn.ModuleDict(
            {name: MeanMetric(sync_on_compute=False) for name in ("loss", "tau", "tau_positive")}
        )
        self.tau_low, self.tau_high = (
            MinMetric(sync_on_compute=False),
            MaxMetric(sync_on_compute=False),
        )
        self._epoch_start = 0.0
        self._max_steps = 1
        self._steps_per_epoch = 1

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        s = self.settings
        # A trained temperature (RGCL-g, TempNet) keeps its own AdamW with its published
        # schedule, stepped after the model's optimizer; the model's optimizer leaves it out.
        loss = self.criterion.loss
        self.tau_optimizer = loss.optimizer([], lr=0.0) if hasattr(loss, "param_groups") else None
        own = {id(p) for p in loss.parameters()}
        params = [p for p in self.parameters() if id(p) not in own]
        if s.optimizer == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(
                params, lr=s.lr, weight_decay=s.weight_decay
            )
        elif s.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        elif s.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=s.lr, momentum=0.9, weight_decay=s.weight_decay)
        else:
            optimizer = LARS(params, lr=s.lr, momentum=0.9, weight_decay=s.weight_decay)
        steps = self.trainer.estimated_stepping_batches
        per_epoch = max(1, steps // max(1, s.epochs))
        scheduler = CosineWarmupScheduler(
            optimizer, warmup_epochs=s.warmup_epochs * per_epoch, max_epochs=int(steps)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ---------------------------------------------------------------- the loop
    def on_train_epoch_start(self) -> None:
        self.criterion.set_epoch(self.current_epoch)
        for metric in (*self.epoch_means.values(), self.tau_low, self.tau_high):
            metric.reset()
        self._epoch_start = time.perf_counter()

    def on_train_start(self) -> None:
        self._max_steps = int(self.trainer.estimated_stepping_batches)
        self._steps_per_epoch = max(1, self._max_steps // max(1, self.trainer.max_epochs))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.criterion.before_step(self.global_step, self._steps_per_epoch, self._max_steps)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Batched augmentation on the training device, outside the mixed-precision context.
        if self.augment is not None and self.trainer.training:
            images, targets, index = batch
            batch = ([self.augment(images), self.augment(images)], targets, index)
        return batch

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.tau_optimizer is not None:
            self.tau_optimizer.step()
            self.tau_optimizer.zero_grad()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x0, x1), _, index = batch
        z0, z1 = self.model(x0), self.model(x1)
        # The loss math runs in float32 whatever the backbone's precision.
        with torch.autocast(device_type=self.device.type, enabled=False):
            loss = self.criterion(z0.float(), z1.float(), index)
        tau = self.criterion.tau_batch.to(loss.device)
        self.epoch_means["loss"].update(loss.detach().float())
        self.epoch_means["tau"].update(tau.float())
        self.tau_low.update(tau.float())
        self.tau_high.update(tau.float())
        if self.criterion.tau_positive is not None:
            self.epoch_means["tau_positive"].update(self.criterion.tau_positive.to(loss.device))
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self.log("tau", tau, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_end(self) -> None:
        record: dict[str, Any] = {
            "epoch": self.current_epoch + 1,
            "seconds": time.perf_counter() - self._epoch_start,
            "steps": self.epoch_means["loss"].update_count,
            "lr": float(self.trainer.optimizers[0].param_groups[0]["lr"]),
        }
        for name, mean in self.epoch_means.items():
            if mean.update_count:
                record[f"{name}_mean"] = float(mean.compute())
        if self.tau_low.update_count:
            record["tau_low"], record["tau_high"] = (
                float(self.tau_low.compute()),
                float(self.tau_high.compute()),
            )
        tau = self.criterion.sample_temperatures()
        if tau is not None:
            analysis = temperature_by_class(tau, self.data.train.targets, self.data)
            record["tau_mean"] = analysis["mean"]
            record["spearman"] = analysis["spearman"]
            record["p_value"] = analysis["p_value"]
            record["tau_class_mean"] = [c["mean"] for c in analysis["per_class"]]
        self.history.append(record)


@dataclass
class RunResult:
    """What one run measured: settings, per-epoch history, evaluation, temperatures."""

    loss: str
    seed: int
    train_seconds: float
    eval_seconds: float
    train_cpu_seconds: float
    eval_cpu_seconds: float
    history: list[dict]
    evaluation: dict
    temperatures: Optional[dict] = None
    temperature_bounds: tuple[float, float] = (math.nan, math.nan)
    sample_temperatures: Optional[list[float]] = None
    checkpoint: str = ""
    extra: dict = field(default_factory=dict)
    # Which long-tailed data the run trained on, and its batch size.
    class_order: str = "natural"
    data_seed: int = 0
    batch_size: int = 0
    # Per-sample local density in the learned feature space at the end of training (the mean
    # cosine similarity of the density_k nearest training images), for per-sample losses.
    sample_density: Optional[list[float]] = None

    def to_dict(self) -> dict:
        return asdict(self)


def _quiet_lightning() -> None:
    """Keeps Lightning's per-run banners and hints out of the output of many short runs."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (
        ".*does not have many workers.*",
        ".*number of training batches.*",
        ".*GPU available but not used.*",
        ".*precision.*is supported by CPUs.*",
        ".*isinstance.treespec, LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", message=message)


def train_loader(
    data: LongTailData, settings: TrainSettings, augment: AugmentSettings, seed: int
) -> DataLoader:
    """Batches of ``(uint8 images, target, index)`` (batched) or ``([view0, view1], ...)``."""
    if settings.augment == "batched":
        dataset = IndexedDataset(ImageTensors(data.train))
    else:
        transform = augment.lightly_transform(data.mean, data.std)
        dataset = IndexedDataset(LightlyViews(data.train, transform))
    # One process: one shuffle stream seeded by the run's seed. Several: each epoch's order from
    # its own derived seed, split over the ranks (Lightning's DistributedSampler would use
    # seed + epoch, so that neighbouring seeds share all but one epoch's order).
    sampler = SeededShuffleSampler(dataset, seed) if settings.devices > 1 else None
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        num_workers=settings.workers,
        persistent_workers=settings.workers > 0,
        generator=None if sampler else torch.Generator().manual_seed(seed),
    )


def _trainer(settings: TrainSettings, label: str) -> pl.Trainer:
    """Lightning's trainer for one run: no logger, checkpoints or validation of its own."""
    precision = "bf16-mixed" if settings.precision == "bf16" else "32-true"
    return pl.Trainer(
        max_epochs=settings.epochs,
        accelerator=settings.accelerator,
        devices=settings.devices,
        strategy=settings.strategy,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=settings.progress,
        callbacks=[RunProgressBar(label, position=settings.progress_position)]
        if settings.progress
        else [],
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,  # train_loader's sampler splits the data over ranks
        limit_train_batches=settings.steps_per_epoch or 1.0,
    )


def _save_checkpoint(
    path: str,
    model: nn.Module,
    loss: TemperatureLoss,
    loss_name: str,
    seed: int,
    data: LongTailData,
    settings: TrainSettings,
    loss_settings: LossSettings,
) -> None:
    """The run's model and loss state, with what rebuilds them (read by the temperature
    analysis)."""
    torch.save(
        {
            "model": model.state_dict(),
            "loss": loss.loss.state_dict(),
            "loss_name": loss_name,
            "seed": seed,
            "train_source_index": data.train_source_index,
            "settings": asdict(settings),
            "loss_settings": asdict(loss_settings),
        },
        path,
    )


def train_and_evaluate(
    loss_name: str,
    seed: int,
    data: LongTailData,
    settings: TrainSettings,
    loss_settings: LossSettings,
    augment_settings: AugmentSettings,
    checkpoint_path: Optional[str] = None,
    label: Optional[str] = None,
) -> Optional[RunResult]:
    """Trains one SimCLR model with ``loss_name`` and evaluates it.

    Returns the run's result on the main process (None on other DDP ranks).
    """
    _quiet_lightning()
    pl.seed_everything(seed, workers=True, verbose=False)
    model = SimCLRModel(
        settings.backbone,
        data.channels,
        data.image_size,
        settings.hidden_dim,
        settings.output_dim,
    )
    gather = settings.devices > 1
    loss_settings = replace(loss_settings, embedding_dim=settings.output_dim)
    loss = TemperatureLoss(loss_name, loss_settings, len(data.train), gather_distributed=gather)
    augment = (
        BatchSimCLRAugment(augment_settings, data.mean, data.std)
        if settings.augment == "batched"
        else None
    )
    module = SimCLRRun(model, loss, settings, augment, data)
    trainer = _trainer(settings, label or f"{loss_name} seed {seed}")
    loader = train_loader(data, settings, augment_settings, seed)
    # Wall time depends on what else runs on the machine; CPU time (all threads) less so.
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(module, train_dataloaders=loader)
    train_seconds = time.perf_counter() - start
    train_cpu_seconds = time.process_time() - cpu_start
    if not trainer.is_global_zero:
        return None

    start, cpu_start = time.perf_counter(), time.process_time()
    device = module.device
    autocast_dtype = torch.bfloat16 if settings.precision == "bf16" else None
    features = {
        name: extract_features(model, split, data.mean, data.std, device, 512, autocast_dtype)
        for name, split in (("train", data.train), ("probe", data.probe), ("test", data.test))
    }
    evaluation = evaluate_features(
        features["train"],
        features["probe"],
        features["test"],
        data,
        settings.knn_k,
        settings.knn_t,
        settings.probe_epochs,
        seed,
    )
    tau = loss.sample_temperatures()
    temperatures = temperature_by_class(tau, data.train.targets, data) if tau is not None else None
    density = (
        knn_density(features["train"].numpy(), min(settings.density_k, len(data.train) - 1))
        if tau is not None
        else None
    )
    eval_seconds = time.perf_counter() - start
    eval_cpu_seconds = time.process_time() - cpu_start
    if checkpoint_path:
        _save_checkpoint(
            checkpoint_path, model, loss, loss_name, seed, data, settings, loss_settings
        )
    return RunResult(
        loss=loss_name,
        seed=seed,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        train_cpu_seconds=train_cpu_seconds,
        eval_cpu_seconds=eval_cpu_seconds,
        history=module.history,
        evaluation=evaluation,
        temperatures=temperatures,
        temperature_bounds=loss_settings.temperature_bounds(loss_name),
        sample_temperatures=tau.tolist() if tau is not None else None,
        checkpoint=checkpoint_path or "",
        class_order=data.class_order,
        data_seed=data.data_seed,
        batch_size=settings.batch_size,
        sample_density=density.tolist() if density is not None else None,
    )
