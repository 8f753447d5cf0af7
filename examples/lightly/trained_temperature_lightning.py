"""SimCLR in PyTorch Lightning with a trained temperature (RGCL-g or TempNet), as in Lightly.

The model keeps Lightly's SGD; ``TrainedTemperature()`` gives the temperature its own AdamW (its
published learning rate and schedule), saved in the checkpoint. ``SeedEveryEpoch(seed)`` makes a
resumed run (``--resume last``) bit-identical to the uninterrupted one, and
``ShardedStateCheckpoint()`` saves and resumes ``--state-layout sharded`` (the per-sample tables
split over the processes) beside Lightning's checkpoint.

Run::

    python examples/lightly/trained_temperature_lightning.py --loss rgclg --epochs 10
    # a tiny run on generated images, two CPU processes, then resumed:
    python examples/lightly/trained_temperature_lightning.py --fake-data --backbone tiny \\
        --devices 2 --strategy ddp --accelerator cpu --state-layout sharded --epochs 1 \\
        --ckpt-dir ckpts
    python examples/lightly/trained_temperature_lightning.py --fake-data --backbone tiny \\
        --devices 2 --strategy ddp --accelerator cpu --state-layout sharded --epochs 2 \\
        --ckpt-dir ckpts --resume last
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
import torchvision
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms.simclr_transform import SimCLRTransform
from torch import nn

from lightly_tau import (
    IndexedDataset,
    ISogCLRLoss,
    RGCLGLoss,
    SeedEveryEpoch,
    ShardedStateCheckpoint,
    SogCLRLoss,
    TempNetLoss,
    TrainedTemperature,
)

LOSSES = ("rgclg", "tempnet", "sogclr", "isogclr")


def build_backbone(name: str) -> tuple[nn.Module, int]:
    if name == "resnet18":
        resnet = torchvision.models.resnet18()
        return nn.Sequential(*list(resnet.children())[:-1], nn.Flatten()), 512
    tiny = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return tiny, 32


def build_loss(name: str, num_samples: int, dim: int, distributed: bool, layout: str) -> nn.Module:
    common = {"gather_distributed": distributed, "state_layout": layout}
    if name == "rgclg":
        return RGCLGLoss(num_samples, **common)
    if name == "tempnet":
        return TempNetLoss(num_samples, dim=dim, **common)
    if name == "sogclr":
        return SogCLRLoss(num_samples, **common)
    return ISogCLRLoss(num_samples, **common)


class SimCLR(pl.LightningModule):
    def __init__(
        self,
        num_samples: int,
        loss: str = "rgclg",
        backbone: str = "resnet18",
        lr: float = 0.06,
        distributed: bool = False,
        state_layout: str = "replicated",
    ) -> None:
        super().__init__()
        self.backbone, features = build_backbone(backbone)
        self.projection_head = SimCLRProjectionHead(features, features, 128)
        self.criterion = build_loss(loss, num_samples, 128, distributed, state_layout)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x))

    def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
        (x0, x1), index = batch[0], batch[-1]
        loss = self.criterion(self.forward(x0), self.forward(x1), index)
        self.log_dict(self.criterion.stats)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Lightly's optimizer, unchanged; TrainedTemperature steps the temperature.
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def build_dataset(args: argparse.Namespace) -> IndexedDataset:
    transform = SimCLRTransform(input_size=args.input_size, gaussian_blur=0.0)
    if args.fake_data:
        base = torchvision.datasets.FakeData(
            size=args.num_samples,
            image_size=(3, args.input_size, args.input_size),
            num_classes=10,
            transform=transform,
        )
    else:
        base = torchvision.datasets.CIFAR10(
            args.data_root, download=True, transform=transform, train=True
        )
    return IndexedDataset(base)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loss", choices=LOSSES, default="rgclg")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.06, help="the model's SGD learning rate")
    parser.add_argument("--backbone", choices=("resnet18", "tiny"), default="resnet18")
    parser.add_argument("--fake-data", action="store_true", help="torchvision FakeData images")
    parser.add_argument("--num-samples", type=int, default=256, help="images of --fake-data")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--data-root", default="datasets/cifar10")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--state-layout", choices=("replicated", "sharded"), default="replicated")
    parser.add_argument("--ckpt-dir", default=None, help="save a checkpoint after every epoch")
    parser.add_argument("--resume", default=None, help="a checkpoint path, or 'last'")
    parser.add_argument("--save-result", default=None, help="write weights, tables, optimizers")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is not None and args.ckpt_dir is None and args.resume == "last":
        parser.error("--resume last needs --ckpt-dir, the folder of the checkpoints.")
    pl.seed_everything(args.seed, verbose=False)
    dataset = build_dataset(args)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,
    )
    model = SimCLR(
        len(dataset),
        loss=args.loss,
        backbone=args.backbone,
        lr=args.lr,
        distributed=args.devices > 1,
        state_layout=args.state_layout,
    )
    callbacks: list[pl.Callback] = [SeedEveryEpoch(args.seed), ShardedStateCheckpoint()]
    if args.loss in ("rgclg", "tempnet"):
        callbacks.append(TrainedTemperature())  # the temperature's own AdamW, checkpointed
    if args.ckpt_dir is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=args.ckpt_dir, save_last=True))
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        devices=args.devices,
        accelerator=args.accelerator,
        strategy=args.strategy,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.ckpt_dir,
    )
    ckpt_path = args.resume
    if ckpt_path == "last":
        ckpt_path = str(Path(args.ckpt_dir) / "last.ckpt")
    trainer.fit(model, dataloader, ckpt_path=ckpt_path)
    tables = {n: model.criterion.state.table(n) for n in model.criterion.state.names}
    cosine = mean_pairwise_cosine(model, dataset)
    if trainer.is_global_zero:
        stats = {k: round(float(v), 5) for k, v in model.criterion.stats.items()}
        print(f"{args.loss}: mean pairwise cosine {cosine:.3f}, {stats}")
    if args.save_result is not None:
        temperature = next((c for c in callbacks if isinstance(c, TrainedTemperature)), None)
        result = {
            "weights": {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)},
            "tables": tables,
            "optimizer": trainer.optimizers[0].state_dict(),
            "temperature_optimizer": None if temperature is None else temperature.state_dict(),
            "cosine": cosine,
        }
        torch.save(result, f"{args.save_result}.rank{trainer.global_rank}")


@torch.no_grad()
def mean_pairwise_cosine(model: SimCLR, dataset: IndexedDataset, count: int = 64) -> float:
    """Mean cosine between the projections of different images (about 1 once collapsed)."""
    model.eval()
    state = torch.get_rng_state()
    images = torch.stack([dataset[i][0][0] for i in range(min(count, len(dataset)))])
    torch.set_rng_state(state)
    z = nn.functional.normalize(model(images), dim=1)
    sim = z @ z.T
    n = sim.shape[0]
    model.train()
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


if __name__ == "__main__":
    main()
