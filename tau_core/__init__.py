"""The torch-only core of lightly-tau: per-sample state, temperature rules, the equations.

What a user of the losses imports: the per-sample state (the tables a stateful loss keeps, its
layouts, the shard checkpoints and the memory line), the temperature rules and the modules
that hold trained temperatures, the common loss bases (``ContrastiveLoss`` for ``set_epoch``
and ``stats``, ``TrainedTemperatureMixin`` for ``param_groups`` and ``optimizer``), and the
equations as functions. What only an adapter (``lightly_tau``, ``openclip_tau``) needs to build
its losses (checks, collectives, the block math, the adapter bases) is in
:mod:`tau_core.adapter`. Nothing in this package imports anything but torch; the names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

# Where each name of the surface is defined: the names load on first use, so that the
# standard-library modules of the core (``tau_core.options``, ``tau_core.registry_source``) serve
# the command lines' ``--help`` without importing torch.
_HOMES = {
    "ContrastiveLoss": "tau_core.losses",
    "FixedTemperature": "tau_core.temperature",
    "GlobalLearnedTemperature": "tau_core.global_temperature",
    "GlobalTemperature": "tau_core.global_temperature",
    "LearnedTemperature": "tau_core.temperature",
    "NetworkTemperature": "tau_core.temperature_network",
    "PerSampleState": "tau_core.state",
    "PerSampleStateBase": "tau_core.state",
    "STATE_LAYOUTS": "tau_core.state",
    "ShardedPerSampleState": "tau_core.state",
    "TemperatureNetwork": "tau_core.temperature_network",
    "TemperatureRule": "tau_core.temperature",
    "TrainedTemperatureMixin": "tau_core.trained",
    "cosine_gamma": "tau_core.functional",
    "describe_state_memory": "tau_core.state",
    "dystress_rows": "tau_core.functional",
    "dystress_temperature": "tau_core.functional",
    "global_contrastive_rows": "tau_core.functional",
    "load_state_shards": "tau_core.state",
    "make_state": "tau_core.state",
    "save_state_shards": "tau_core.state",
    "temperature_stats": "tau_core.losses",
    "temperature_step": "tau_core.functional",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value  # the next access is a plain attribute
        return value
    raise AttributeError(f"module 'tau_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
