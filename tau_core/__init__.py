"""The torch-only core of lightly-tau: per-sample state, the block math, temperature rules, bases.

Both adapters (``lightly_tau`` for Lightly, ``openclip_tau`` for OpenCLIP) import only the names
listed here. Nothing in this package imports anything but torch.
"""

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
from tau_core.functional import (
    cosine_gamma,
    dystress_rows,
    dystress_temperature,
    global_contrastive_rows,
    temperature_step,
    weighted_similarity_sum,
    with_value,
)
from tau_core.losses import (
    DYSTRESS_MONOTONE_RATIO,
    DYSTRESS_RANKING_RATIO,
    AnchorBlock,
    ContrastiveLoss,
    DySTreSSBase,
    GlobalContrastiveLoss,
    normalized_float32,
    temperature_stats,
)
from tau_core.state import (
    STATE_LAYOUTS,
    PerSampleState,
    ShardedPerSampleState,
    describe_state_memory,
    load_state_shards,
    make_state,
    save_state_shards,
)
from tau_core.temperature import FixedTemperature, LearnedTemperature, TemperatureRule
from tau_core.tiled import check_chunk_size, tiled_dystress, tiled_global_contrastive
from tau_core.trained import (
    GlobalLearnedTemperature,
    GlobalTemperature,
    GlobalTemperatureLoss,
    NetworkTemperature,
    TemperatureNetwork,
    TemperatureNetworkLoss,
    TrainedTemperatureMixin,
    average_gradient_over_ranks,
    build_networks,
    derive_seed,
)

__all__ = [
    "DYSTRESS_MONOTONE_RATIO",
    "DYSTRESS_RANKING_RATIO",
    "AnchorBlock",
    "ContrastiveLoss",
    "DySTreSSBase",
    "FixedTemperature",
    "GlobalContrastiveLoss",
    "GlobalLearnedTemperature",
    "GlobalTemperature",
    "GlobalTemperatureLoss",
    "LearnedTemperature",
    "NetworkTemperature",
    "PerSampleState",
    "STATE_LAYOUTS",
    "ShardedPerSampleState",
    "describe_state_memory",
    "load_state_shards",
    "save_state_shards",
    "make_state",
    "TemperatureNetwork",
    "TemperatureNetworkLoss",
    "TemperatureRule",
    "TrainedTemperatureMixin",
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
    "concat_all_gather",
    "cosine_gamma",
    "derive_seed",
    "dystress_rows",
    "dystress_temperature",
    "gather_with_grad",
    "global_contrastive_rows",
    "is_distributed",
    "normalized_float32",
    "rank",
    "temperature_stats",
    "tiled_dystress",
    "tiled_global_contrastive",
    "temperature_step",
    "weighted_similarity_sum",
    "with_value",
    "world_size",
]
