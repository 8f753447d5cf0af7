"""Temperature-aware contrastive losses for Lightly: SogCLR, iSogCLR and DySTreSS."""

from lightly_tau.data import IndexedDataset
from lightly_tau.functional import cosine_gamma, dystress_temperature, global_contrastive_rows
from lightly_tau.losses import DySTreSSLoss, ISogCLRLoss, SogCLRLoss, temperature_stats
from lightly_tau.state import PerSampleState

__version__ = "0.1.0"

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
