"""SimCLR in a plain PyTorch loop with a trained temperature (RGCL-g or TempNet), as in Lightly.

The model keeps Lightly's SGD; the temperature gets its own AdamW, ``criterion.optimizer()``
(its published learning rate and schedule, no weight decay), stepped beside the model's.

Run::

    python examples/lightly/trained_temperature.py --epochs 10          # CIFAR-10, ResNet-18
    python examples/lightly/trained_temperature.py --fake-data --backbone tiny --epochs 1
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch
import torchvision
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms.simclr_transform import SimCLRTransform
from torch import nn

from lightly_tau import IndexedDataset, RGCLGLoss, TempNetLoss


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loss", choices=("rgclg", "tempnet"), default="rgclg")
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone, features = build_backbone(args.backbone)
    model = nn.Sequential(backbone, SimCLRProjectionHead(features, features, 128)).to(device)

    transform = SimCLRTransform(input_size=args.input_size, gaussian_blur=0.0)
    if args.fake_data:
        size = (3, args.input_size, args.input_size)
        base = torchvision.datasets.FakeData(args.num_samples, size, 10, transform=transform)
    else:
        base = torchvision.datasets.CIFAR10(args.data_root, download=True, transform=transform)
    dataset = IndexedDataset(base)  # every item ends with its dataset index
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,
    )

    if args.loss == "rgclg":
        criterion = RGCLGLoss(len(dataset)).to(device)
    else:
        criterion = TempNetLoss(len(dataset), dim=128).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)  # the model's
    tau_optimizer = criterion.optimizer()  # the temperature's own AdamW and schedule

    for epoch in range(args.epochs):
        criterion.set_epoch(epoch)  # TempNet's learning rate decays per epoch
        total = torch.zeros((), device=device)
        for batch in dataloader:
            (x0, x1), index = batch[0], batch[-1].to(device)
            loss = criterion(model(x0.to(device)), model(x1.to(device)), index)
            loss.backward()  # the per-sample state is written when backward reaches the loss
            optimizer.step()
            tau_optimizer.step()
            optimizer.zero_grad()
            tau_optimizer.zero_grad()
            total += loss.detach()
        stats = criterion.stats
        print(
            f"epoch {epoch:>02}  loss {total.item() / len(dataloader):.5f}  "
            f"tau p50 {stats['tau_p50']:.4f}  (p10 {stats['tau_p10']:.4f}, "
            f"p90 {stats['tau_p90']:.4f})"
        )

    model.eval()
    with torch.no_grad():
        x = torch.stack([dataset[i][0][0] for i in range(min(64, len(dataset)))]).to(device)
        z = nn.functional.normalize(model(x), dim=1)
        n = z.shape[0]
        cosine = float(((z @ z.T).sum() - n) / (n * (n - 1)))
        if args.loss == "tempnet":  # the temperature of any image, also one never trained on
            print(f"temperatures of {n} images: {criterion.temperature_of(model(x))[:4]} ...")
    print(f"mean pairwise cosine of the projections: {cosine:.3f}")
    return {"cosine": cosine, "tau_p50": float(criterion.stats["tau_p50"])}


if __name__ == "__main__":
    main()
