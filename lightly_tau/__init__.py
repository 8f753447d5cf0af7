"""Temperature-aware contrastive losses for Lightly: SogCLR, iSogCLR and DySTreSS."""

from lightly_tau.data import IndexedDataset
from lightly_tau.losses import DySTreSSLoss, ISogCLRLoss, SogCLRLoss
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
    "IndexedDataset",
    "PerSampleState",
    "SogCLRLoss",
    "cosine_gamma",
    "dystress_temperature",
    "global_contrastive_rows",
    "temperature_stats",
]
