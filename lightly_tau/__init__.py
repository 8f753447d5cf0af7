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

#: Lightning callbacks, imported on first use (``pytorch_lightning`` is needed only for them).
_LIGHTNING = ("SeedEveryEpoch", "ShardedStateCheckpoint", "TrainedTemperature")


def __getattr__(name: str) -> object:
    if name in _LIGHTNING:
        from lightly_tau import lightning

        return getattr(lightning, name)
    raise AttributeError(f"module 'lightly_tau' has no attribute {name!r}")


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
