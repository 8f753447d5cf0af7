"""Argument checks shared by every loss: each error names the argument and its allowed range."""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor


def check_number(
    name: str,
    value: float,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Returns ``float(value)`` or raises ``ValueError`` unless it lies in the given interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if math.isnan(value) or below or above:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}.")
    return value


def check_temperature_range(tau_min: float, tau_max: float) -> tuple[float, float]:
    tau_min = check_number("tau_min", tau_min, 0.0, low_open=True)
    tau_max = check_number("tau_max", tau_max, 0.0, low_open=True)
    if tau_min > tau_max:
        raise ValueError(f"tau_min ({tau_min:g}) must not exceed tau_max ({tau_max:g}).")
    return tau_min, tau_max


def check_pair_features(name0: str, out0: Tensor, name1: str, out1: Tensor) -> None:
    """Both feature tensors must be 2-D floating point with the same shape and a non-empty batch."""
    for name, out in ((name0, out0), (name1, out1)):
        if not isinstance(out, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(out)}.")
        if out.dim() != 2:
            raise ValueError(
                f"{name} must be 2-D (batch_size, embedding_size), got shape {tuple(out.shape)}."
            )
        if not out.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got dtype {out.dtype}.")
    if out0.shape != out1.shape:
        raise ValueError(
            f"{name0} and {name1} must have the same shape, got {tuple(out0.shape)} and "
            f"{tuple(out1.shape)}."
        )


def pair_features_problem(name0: str, out0: Tensor, name1: str, out1: Tensor) -> Optional[str]:
    """What :func:`check_pair_features` would raise, as a message (None when the pair is fine)."""
    try:
        check_pair_features(name0, out0, name1, out1)
    except ValueError as err:
        return str(err)
    return None


def check_optional_epochs(name: str, value: Optional[int]) -> Optional[int]:
    """``value`` if it is None or an integer >= 1, else a ``ValueError`` naming ``name``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}.")
    return value


def check_flag(name: str, value: bool) -> bool:
    """``value`` if it is a bool, else a ``ValueError`` naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return value
