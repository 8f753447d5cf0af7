"""Temperature-aware contrastive losses for Lightly's SimCLR pipeline, one loss per module.

The modules only build SimCLR's similarity block (both local views as anchors against both
gathered views, :mod:`~lightly_tau.losses.unimodal`) and state each loss's arguments; the math,
the state and the checks are ``tau_core``'s. Every loss is imported from here (or from
``lightly_tau``):

- :mod:`~lightly_tau.losses.sogclr`: :class:`SogCLRLoss`;
- :mod:`~lightly_tau.losses.isogclr`: :class:`ISogCLRLoss`;
- :mod:`~lightly_tau.losses.rgclg`: :class:`RGCLGLoss`;
- :mod:`~lightly_tau.losses.tempnet`: :class:`TempNetLoss`;
- :mod:`~lightly_tau.losses.dystress`: :class:`DySTreSSLoss`.
"""

from lightly_tau.losses.dystress import DySTreSSLoss
from lightly_tau.losses.isogclr import ISogCLRLoss
from lightly_tau.losses.rgclg import RGCLGLoss
from lightly_tau.losses.sogclr import SogCLRLoss
from lightly_tau.losses.tempnet import TempNetLoss
from lightly_tau.losses.unimodal import FEATURE_NAMES, IndexLike, unimodal_blocks

__all__ = [
    "FEATURE_NAMES",
    "DySTreSSLoss",
    "ISogCLRLoss",
    "IndexLike",
    "RGCLGLoss",
    "SogCLRLoss",
    "TempNetLoss",
    "unimodal_blocks",
]
