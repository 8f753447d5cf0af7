"""Temperature-aware image-text losses for OpenCLIP: SogCLR, iSogCLR, RGCL-g, TempNet, DySTreSS."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tau_core.lazy import lazy_exports

if TYPE_CHECKING:
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

# The losses (and torch) load on first use, so that the package's command lines
# (``python -m openclip_tau.key_index --help``) answer without importing torch.
__getattr__, __dir__ = lazy_exports(__name__)
