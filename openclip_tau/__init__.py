"""Temperature-aware image-text losses for OpenCLIP: SogCLR, iSogCLR, RGCL-g, TempNet, DySTreSS."""

from openclip_tau.losses import (
    DySTreSSClipLoss,
    ISogCLRClipLoss,
    RGCLGClipLoss,
    SogCLRClipLoss,
    TempNetClipLoss,
)

__all__ = [
    "DySTreSSClipLoss",
    "ISogCLRClipLoss",
    "RGCLGClipLoss",
    "SogCLRClipLoss",
    "TempNetClipLoss",
]
