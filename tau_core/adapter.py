"""What an adapter of the core to a host library needs: the plumbing behind its losses.

``lightly_tau`` and ``openclip_tau`` import from :mod:`tau_core` (the user API) and from this
module only. Here: the loss bases an adapter subclasses (``GlobalContrastiveLoss`` and
``DySTreSSBase`` with their ``anchor_blocks`` hook and :class:`AnchorBlock`, the SogCLR, RGCL-g
and TempNet mixins), the argument checks, the collectives, the block math and its tiled form, the
seeds, and the reading of a loss class's options from its signature (for the registries).
"""

from tau_core.blocks import AnchorBlock
from tau_core.checks import (
    check_flag,
    check_number,
    check_optional_epochs,
    check_pair_features,
    check_temperature_range,
)
from tau_core.distributed import (
    all_gather_variable,
    all_reduce_max,
    concat_all_gather,
    gather_with_grad,
    is_distributed,
    rank,
    world_size,
)
from tau_core.dystress import DYSTRESS_MONOTONE_RATIO, DYSTRESS_RANKING_RATIO, DySTreSSBase
from tau_core.functional import weighted_similarity_sum, with_value
from tau_core.global_contrastive import GlobalContrastiveLoss
from tau_core.global_temperature import GlobalTemperatureLoss
from tau_core.losses import normalized_float32
from tau_core.options import (
    PLUMBING,
    LossOption,
    class_options,
    docstring_help,
    signature_keywords,
    takes_index,
    temperature_bounds,
)
from tau_core.temperature import FixedTemperatureMixin
from tau_core.temperature_network import TemperatureNetworkLoss, build_networks
from tau_core.tiled import check_chunk_size, tiled_dystress, tiled_global_contrastive
from tau_core.trained import average_gradient_over_ranks, derive_seed

__all__ = [
    "DYSTRESS_MONOTONE_RATIO",
    "DYSTRESS_RANKING_RATIO",
    "PLUMBING",
    "AnchorBlock",
    "DySTreSSBase",
    "FixedTemperatureMixin",
    "GlobalContrastiveLoss",
    "GlobalTemperatureLoss",
    "LossOption",
    "TemperatureNetworkLoss",
    "all_gather_variable",
    "all_reduce_max",
    "average_gradient_over_ranks",
    "build_networks",
    "check_chunk_size",
    "check_flag",
    "check_number",
    "check_optional_epochs",
    "check_pair_features",
    "check_temperature_range",
    "class_options",
    "concat_all_gather",
    "derive_seed",
    "docstring_help",
    "gather_with_grad",
    "is_distributed",
    "normalized_float32",
    "rank",
    "signature_keywords",
    "takes_index",
    "temperature_bounds",
    "tiled_dystress",
    "tiled_global_contrastive",
    "weighted_similarity_sum",
    "with_value",
    "world_size",
]
