"""Temperature-aware contrastive losses for Lightly: SogCLR, iSogCLR, RGCL-g, TempNet, DySTreSS."""

from typing import TYPE_CHECKING

from lightly_tau.data import IndexedCollate, IndexedDataset
from lightly_tau.losses import DySTreSSLoss, ISogCLRLoss, RGCLGLoss, SogCLRLoss, TempNetLoss
from tau_core import (
    PerSampleState,
    cosine_gamma,
    dystress_temperature,
    global_contrastive_rows,
    temperature_stats,
)
from tau_core.lazy import lazy_exports

__version__ = "0.2.0"

if TYPE_CHECKING:  # Lightning callbacks: pytorch_lightning is needed only for them
    from lightly_tau.lightning import SeedEveryEpoch, ShardedStateCheckpoint, TrainedTemperature

__all__ = [
    "DySTreSSLoss",
    "ISogCLRLoss",
    "IndexedCollate",
    "IndexedDataset",
    "PerSampleState",
    "RGCLGLoss",
    "SeedEveryEpoch",
    "ShardedStateCheckpoint",
    "SogCLRLoss",
    "TempNetLoss",
    "TrainedTemperature",
    "cosine_gamma",
    "dystress_temperature",
    "global_contrastive_rows",
    "temperature_stats",
]

__getattr__, __dir__ = lazy_exports(__name__)
