"""The torch-only core of lightly-tau: per-sample state, temperature rules, the equations.

What a user of the losses imports: the per-sample state (the tables a stateful loss keeps, its
layouts, the shard checkpoints and the memory line), the temperature rules and the modules
that hold trained temperatures, the common loss bases (``ContrastiveLoss`` for ``set_epoch``
and ``stats``, ``TrainedTemperatureMixin`` for ``param_groups`` and ``optimizer``), and the
equations as functions. What only an adapter (``lightly_tau``, ``openclip_tau``) needs to build
its losses (checks, collectives, the block math, the adapter bases) is in
:mod:`tau_core.adapter`. Nothing in this package imports anything but torch; the names below
load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tau_core.lazy import lazy_exports

if TYPE_CHECKING:
    from tau_core.functional import (
        cosine_gamma,
        dystress_rows,
        dystress_temperature,
        global_contrastive_rows,
        temperature_step,
    )
    from tau_core.global_temperature import GlobalLearnedTemperature, GlobalTemperature
    from tau_core.losses import ContrastiveLoss, temperature_stats
    from tau_core.state import (
        STATE_LAYOUTS,
        PerSampleState,
        PerSampleStateBase,
        ShardedPerSampleState,
        describe_state_memory,
        load_state_shards,
        make_state,
        save_state_shards,
    )
    from tau_core.temperature import FixedTemperature, LearnedTemperature, TemperatureRule
    from tau_core.temperature_network import NetworkTemperature, TemperatureNetwork
    from tau_core.trained import TrainedTemperatureMixin


__all__ = [
    "ContrastiveLoss",
    "FixedTemperature",
    "GlobalLearnedTemperature",
    "GlobalTemperature",
    "LearnedTemperature",
    "NetworkTemperature",
    "PerSampleState",
    "PerSampleStateBase",
    "STATE_LAYOUTS",
    "ShardedPerSampleState",
    "TemperatureNetwork",
    "TemperatureRule",
    "TrainedTemperatureMixin",
    "cosine_gamma",
    "describe_state_memory",
    "dystress_rows",
    "dystress_temperature",
    "global_contrastive_rows",
    "load_state_shards",
    "make_state",
    "save_state_shards",
    "temperature_stats",
    "temperature_step",
]

__getattr__, __dir__ = lazy_exports(__name__)
