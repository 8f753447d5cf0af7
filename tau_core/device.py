"""The accelerator runtime calls of the losses (events, pinned host copies, generators), in one
place.

Everything else in the core is tensor operations, which run on any device and under PyTorch's
``FakeTensorMode``. The few calls here need a real CUDA runtime; a test without a GPU replaces
them (``monkeypatch.setattr(tau_core.device, "record_event", ...)``) to drive the CUDA code paths
on fake CUDA tensors.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor


def copy_to_host(values: Tensor) -> Tensor:
    """``values`` on the host: a pinned copy queued behind the device's kernels for CUDA tensors
    (it does not wait for them; read it once :func:`record_event`'s event is ready), ``values``
    itself for CPU tensors."""
    if values.device.type != "cuda":
        return values
    host = torch.empty(values.shape, dtype=values.dtype, device="cpu", pin_memory=True)
    host.copy_(values, non_blocking=True)
    return host


def record_event(device: torch.device) -> Optional[Any]:
    """A CUDA event recorded on ``device``'s current stream (None for other devices)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def event_ready(event: Optional[Any]) -> bool:
    """Whether the work queued before ``event`` has finished (True for None); never waits."""
    return event is None or bool(event.query())


def wait_event(event: Optional[Any]) -> None:
    """Blocks the host until ``event`` has completed (nothing for None)."""
    if event is not None:
        event.synchronize()


def generator(device: torch.device) -> torch.Generator:
    """A new random number generator on ``device`` (a CUDA one needs the CUDA runtime)."""
    return torch.Generator(device=device)


def host_values(host: Tensor) -> list:
    """The values of a host tensor (from :func:`copy_to_host`, once its event is ready)."""
    return host.tolist()
