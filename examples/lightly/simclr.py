"""Lightly's SimCLR example (``examples/pytorch/simclr.py``) with iSogCLR's loss.

The lines that differ from Lightly's example end with ``# lightly-tau``. As upstream, it trains
on CIFAR-10 (downloaded into ``datasets/cifar10``)::

    python examples/lightly/simclr.py

Options choose the data and the length of the run, e.g. a few seconds on random images::

    python examples/lightly/simclr.py --fake-data 64 --epochs 2 --batch-size 16 --num-workers 0
"""

import argparse

import torch
import torchvision
from lightly.data import LightlyDataset
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms.simclr_transform import SimCLRTransform
from torch import nn

from lightly_tau import IndexedDataset, ISogCLRLoss, SogCLRLoss  # lightly-tau: was NTXentLoss

parser = argparse.ArgumentParser(description="Lightly's SimCLR example with a lightly-tau loss.")
parser.add_argument("--loss", choices=["isogclr", "sogclr"], default="isogclr")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=256)
parser.add_argument("--num-workers", type=int, default=8)
parser.add_argument("--lr", type=float, default=0.06)
data = parser.add_mutually_exclusive_group()
data.add_argument("--fake-data", type=int, metavar="N", help="N random images, no download")
data.add_argument("--image-folder", metavar="DIR", help="a folder of images or videos")
args = parser.parse_args()


class SimCLR(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(512, 512, 128)

    def forward(self, x):
        x = self.backbone(x).flatten(start_dim=1)
        z = self.projection_head(x)
        return z


resnet = torchvision.models.resnet18()
backbone = nn.Sequential(*list(resnet.children())[:-1])
model = SimCLR(backbone)

device = "cuda" if torch.cuda.is_available() else "cpu"
model.to(device)

transform = SimCLRTransform(input_size=32, gaussian_blur=0.0)
if args.fake_data:  # lightly-tau: tiny random images for a quick run
    dataset = torchvision.datasets.FakeData(args.fake_data, (3, 32, 32), transform=transform)
elif args.image_folder:
    dataset = LightlyDataset(args.image_folder, transform=transform)
else:
    dataset = torchvision.datasets.CIFAR10("datasets/cifar10", download=True, transform=transform)
dataset = IndexedDataset(dataset)  # lightly-tau: every item ends with its dataset index

dataloader = torch.utils.data.DataLoader(
    dataset,
    batch_size=args.batch_size,
    shuffle=True,
    drop_last=True,
    num_workers=args.num_workers,
)

# --8<-- [start:loss]
loss_class = ISogCLRLoss if args.loss == "isogclr" else SogCLRLoss
criterion = loss_class(len(dataset)).to(device)  # lightly-tau: was NTXentLoss()
# --8<-- [end:loss]
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

print("Starting Training")
# --8<-- [start:loop]
for epoch in range(args.epochs):
    criterion.set_epoch(epoch)  # lightly-tau: gamma schedules follow the epoch
    total_loss = 0
    for batch in dataloader:
        x0, x1 = batch[0]
        index = batch[-1].to(device)  # lightly-tau: the dataset index of each image
        x0 = x0.to(device)
        x1 = x1.to(device)
        z0 = model(x0)
        z1 = model(x1)
        loss = criterion(z0, z1, index)  # lightly-tau: was criterion(z0, z1)
        total_loss += loss.detach()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    avg_loss = total_loss / len(dataloader)
    tau = criterion.stats["tau_mean"]  # lightly-tau: the batch's mean temperature
    print(f"epoch: {epoch:>02}, loss: {avg_loss:.5f}, tau: {tau:.4f}")
# --8<-- [end:loop]

# lightly-tau: the per-sample state is part of the loss's state_dict; save it with the model.
torch.save({"model": model.state_dict(), "loss": criterion.state_dict()}, "simclr.pt")
