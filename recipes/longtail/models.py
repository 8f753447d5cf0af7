"""Backbones and the SimCLR model: a backbone with Lightly's ``SimCLRProjectionHead``."""

from __future__ import annotations

import torch
import torchvision
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor, nn

from recipes.longtail.names import BACKBONES  # noqa: F401


class SmallConvNet(nn.Module):
    """Five 3x3 conv-BN-ReLU layers (16-32-32-64-128 channels, three with stride 2), global pool.

    A backbone that trains on two CPU cores in minutes (about 0.2 s per SimCLR step at batch
    256 on 28 px images); a torchvision ResNet-18 takes about 5 s per step there.
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (16, 32, 32, 64, 128)) -> None:
        super().__init__()
        strides = (1, 2, 1, 2, 2)
        layers: list[nn.Module] = []
        channels = in_channels
        for width, stride in zip(widths, strides):
            layers += [
                nn.Conv2d(channels, width, 3, stride, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.layers = nn.Sequential(*layers)
        self.output_dim = channels

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def resnet18_backbone(in_channels: int, image_size: int) -> nn.Module:
    """torchvision's ResNet-18 without its classifier (512-d output).

    Images up to 64 px get the CIFAR stem of Lightly's CIFAR-10 benchmark and the SimCLR paper
    (3x3 convolution with stride 1, no max pooling); larger images keep the ImageNet stem.
    """
    model = torchvision.models.resnet18(weights=None)
    if image_size <= 64:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    model.fc = nn.Identity()
    model.output_dim = 512
    return model


def build_backbone(name: str, in_channels: int, image_size: int) -> nn.Module:
    """A backbone by name; its ``output_dim`` attribute is the feature size."""
    if name == "convnet":
        return SmallConvNet(in_channels)
    if name == "resnet18":
        return resnet18_backbone(in_channels, image_size)
    raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}.")


class SimCLRModel(nn.Module):
    """Backbone plus Lightly's ``SimCLRProjectionHead``, as in Lightly's SimCLR example.

    ``features`` are the backbone's output (what kNN and the linear probe read); ``forward``
    returns the projections the contrastive loss sees.
    """

    def __init__(
        self,
        backbone: str,
        in_channels: int,
        image_size: int,
        hidden_dim: int = 512,
        output_dim: int = 128,
    ) -> None:
        super().__init__()
        self.backbone = build_backbone(backbone, in_channels, image_size)
        self.projection_head = SimCLRProjectionHead(
            self.backbone.output_dim, hidden_dim, output_dim
        )

    @property
    def feature_dim(self) -> int:
        return int(self.backbone.output_dim)

    def features(self, x: Tensor) -> Tensor:
        return torch.flatten(self.backbone(x), start_dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection_head(self.features(x))
