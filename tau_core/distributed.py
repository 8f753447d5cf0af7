"""torch.distributed helpers of the losses: rank and world size, gathers, errors agreed by all ranks.

Only ``torch.distributed`` is used, so the core runs wherever torch does (no Lightly, no OpenCLIP).
Every function works without a process group (one process): it then does no communication.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch import distributed as torch_dist


def is_distributed() -> bool:
    """True when a default process group with more than one rank exists."""
    return (
        torch_dist.is_available()
        and torch_dist.is_initialized()
        and torch_dist.get_world_size() > 1
    )


def world_size() -> int:
    """Number of ranks of the default process group (1 without one)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_world_size()
    return 1


def rank() -> int:
    """Rank of this process in the default process group (0 without one)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank()
    return 0


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0; the backward pass sums gradients over ranks.

    ``torch.distributed.nn.functional.all_gather`` returns every rank's slice with autograd; its
    backward reduces the gradient of each slice to its owner, which is what DDP's averaging
    expects (the same as ``lightly.utils.dist.gather``). One process: ``x`` itself.
    """
    if not is_distributed():
        return x
    from torch.distributed.nn import functional as dist_fn

    return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)


def concat_all_gather(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0, without autograd (indices and state rows)."""
    if not is_distributed():
        return x
    output = [torch.empty_like(x) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(output, x.contiguous())
    return torch.cat(output, dim=0)


def all_reduce_max(x: Tensor) -> Tensor:
    """Element-wise maximum of ``x`` over all ranks (``x`` itself in one process)."""
    if is_distributed():
        x = x.clone()
        torch_dist.all_reduce(x, op=torch_dist.ReduceOp.MAX)
    return x


def raise_agreed(message: Optional[str], error: type[Exception] = ValueError) -> None:
    """Raises on every rank when any rank has a ``message`` (a collective: all ranks must call).

    A rank that found a problem in its own batch would otherwise raise alone and leave the others
    waiting in the next gather forever. The messages travel only when one exists.
    """
    if not is_distributed():
        if message:
            raise error(message)
        return
    messages: list[Optional[str]] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(messages, message)
    for source, text in enumerate(messages):
        if text:
            if text == message:
                raise error(message)
            raise error(f"rank {source} stopped the step: {text}")


def require_distributed(gather_distributed: bool) -> None:
    """Lightly's check: gathering needs a torch build with distributed support."""
    if gather_distributed and not torch_dist.is_available():
        raise ValueError(
            "gather_distributed is True but torch.distributed is not available. "
            "Please set gather_distributed=False or install a torch version with "
            "distributed support."
        )
