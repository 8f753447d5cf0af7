"""Temperature-aware image-text losses for OpenCLIP: SogCLR, iSogCLR and DySTreSS."""

from openclip_tau.losses import DySTreSSClipLoss, ISogCLRClipLoss, SogCLRClipLoss

__all__ = ["DySTreSSClipLoss", "ISogCLRClipLoss", "SogCLRClipLoss"]
