"""Temperature-aware contrastive losses for Lightly: SogCLR, iSogCLR, RGCL-g, TempNet, DySTreSS."""

from lightly_tau.data import IndexedCollate, IndexedDataset
from lightly_tau.losses import DySTreSSLoss, ISogCLRLoss, RGCLGLoss, SogCLRLoss, TempNetLoss
from tau_core import (
    PerSampleState,
    cosine_gamma,
    dystress_temperature,
    global_contrastive_rows,
    temperature_stats,
)

__version__ = "0.2.0"

__all__ = [
    "DySTreSSLoss",
    "ISogCLRLoss",
    "IndexedCollate",
    "IndexedDataset",
    "PerSampleState",
    "RGCLGLoss",
    "SogCLRLoss",
    "TempNetLoss",
    "cosine_gamma",
    "dystress_temperature",
    "global_contrastive_rows",
    "temperature_stats",
]
