"""Lightly's SimCLR example for PyTorch Lightning (``examples/pytorch_lightning/simclr.py``).

With iSogCLR's loss; the lines that differ from Lightly's example end with ``# lightly-tau``.
As upstream, it trains on CIFAR-10 (downloaded into ``datasets/cifar10``) on one device::

    python examples/lightly/simclr_lightning.py

A few seconds on random images::

    python examples/lightly/simclr_lightning.py --fake-data 64 --epochs 2 --batch-size 16 \
        --num-workers 0
"""

# Note: The model and training settings do not follow the reference settings
# from the paper. The settings are chosen such that the example can easily be
# run on a small dataset with a single GPU.

import argparse

import pytorch_lightning as pl
import torch
import torchvision
from lightly.data import LightlyDataset
from lightly.data.multi_view_collate import MultiViewCollate
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms.simclr_transform import SimCLRTransform
from torch import nn

from lightly_tau import IndexedCollate, IndexedDataset, ISogCLRLoss  # lightly-tau

parser = argparse.ArgumentParser(
    description="Lightly's Lightning SimCLR example, lightly-tau loss."
)
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--batch-size", type=int, default=256)
parser.add_argument("--num-workers", type=int, default=8)
parser.add_argument("--fake-data", type=int, metavar="N", help="N random images, no download")
parser.add_argument("--checkpoint-dir", default=None, help="where Lightning writes checkpoints")
args = parser.parse_args()


# --8<-- [start:module]
class SimCLR(pl.LightningModule):
    def __init__(self, num_samples):  # lightly-tau: the size of the training set
        super().__init__()
        resnet = torchvision.models.resnet18()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = SimCLRProjectionHead(512, 2048, 2048)
        self.criterion = ISogCLRLoss(num_samples)  # lightly-tau: was NTXentLoss()

    def forward(self, x):
        x = self.backbone(x).flatten(start_dim=1)
        z = self.projection_head(x)
        return z

    def on_train_epoch_start(self):
        self.criterion.set_epoch(self.current_epoch)  # lightly-tau: gamma schedules

    def training_step(self, batch, batch_index):
        (x0, x1), index = batch[0], batch[-1]  # lightly-tau: was (x0, x1), _, _ = batch
        z0 = self.forward(x0)
        z1 = self.forward(x1)
        loss = self.criterion(z0, z1, index)  # lightly-tau: was self.criterion(z0, z1)
        self.log_dict(self.criterion.stats)  # lightly-tau: objective and temperatures
        return loss

    def configure_optimizers(self):
        optim = torch.optim.SGD(self.parameters(), lr=0.06)
        return optim


# --8<-- [end:module]


transform = SimCLRTransform(input_size=32)
if args.fake_data:  # lightly-tau: tiny random images for a quick run
    data = torchvision.datasets.FakeData(args.fake_data, (3, 32, 32))
else:
    data = torchvision.datasets.CIFAR10("datasets/cifar10", download=True)
dataset = LightlyDataset.from_torch_dataset(data, transform=transform)
# or create a dataset from a folder containing images or videos:
# dataset = LightlyDataset("path/to/folder", transform=transform)
dataset = IndexedDataset(dataset)  # lightly-tau: every item ends with its dataset index

model = SimCLR(num_samples=len(dataset))  # lightly-tau: built after the dataset

collate_fn = IndexedCollate(MultiViewCollate())  # lightly-tau: was MultiViewCollate()

dataloader = torch.utils.data.DataLoader(
    dataset,
    batch_size=args.batch_size,
    collate_fn=collate_fn,
    shuffle=True,
    drop_last=True,
    num_workers=args.num_workers,
)

accelerator = "gpu" if torch.cuda.is_available() else "cpu"

# lightly-tau: the per-sample tables are in the loss's state_dict, so in every checkpoint.
trainer = pl.Trainer(
    max_epochs=args.epochs,
    devices=1,
    accelerator=accelerator,
    default_root_dir=args.checkpoint_dir,
)
trainer.fit(model=model, train_dataloaders=dataloader)
