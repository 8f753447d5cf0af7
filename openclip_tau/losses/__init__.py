"""Image-text SogCLR, iSogCLR, RGCL-g, TempNet and DySTreSS with OpenCLIP's ``ClipLoss`` call
signature, one loss per module.

The per-sample state, the block math, the temperature rules and the forward are ``tau_core``'s;
these modules only build the two image-text blocks (image anchors against the gathered texts,
text anchors against the gathered images, one state per anchor role,
:mod:`~openclip_tau.losses.image_text`) and speak ``ClipLoss``'s arguments. They need neither
Lightly nor anything of OpenCLIP. Every loss is imported from here (or from ``openclip_tau``):

- :mod:`~openclip_tau.losses.sogclr`: :class:`SogCLRClipLoss`;
- :mod:`~openclip_tau.losses.isogclr`: :class:`ISogCLRClipLoss`;
- :mod:`~openclip_tau.losses.rgclg`: :class:`RGCLGClipLoss`;
- :mod:`~openclip_tau.losses.tempnet`: :class:`TempNetClipLoss`;
- :mod:`~openclip_tau.losses.dystress`: :class:`DySTreSSClipLoss`.
"""

from openclip_tau.losses.dystress import DySTreSSClipLoss
from openclip_tau.losses.image_text import (
    FEATURE_NAMES,
    ROLES,
    IndexLike,
    image_text_blocks,
    unused_parameters_term,
)
from openclip_tau.losses.isogclr import ISogCLRClipLoss
from openclip_tau.losses.rgclg import RGCLGClipLoss
from openclip_tau.losses.sogclr import SogCLRClipLoss
from openclip_tau.losses.tempnet import TempNetClipLoss

__all__ = [
    "FEATURE_NAMES",
    "ROLES",
    "DySTreSSClipLoss",
    "ISogCLRClipLoss",
    "IndexLike",
    "RGCLGClipLoss",
    "SogCLRClipLoss",
    "TempNetClipLoss",
    "image_text_blocks",
    "unused_parameters_term",
]
