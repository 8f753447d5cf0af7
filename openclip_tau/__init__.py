"""Temperature-aware image-text losses for OpenCLIP: SogCLR, iSogCLR, RGCL-g, TempNet, DySTreSS."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    # The losses (and torch) load on first use, so that the package's command lines
    # (``python -m openclip_tau.key_index --help``) answer without importing torch.
    if name in __all__:
        return getattr(importlib.import_module("openclip_tau.losses"), name)
    raise AttributeError(f"module 'openclip_tau' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
