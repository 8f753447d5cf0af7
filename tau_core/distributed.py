"""torch.distributed helpers of the losses: rank and world size, gathers, errors agreed by all ranks.

Only ``torch.distributed`` is used, so the core runs wherever torch does (no Lightly, no OpenCLIP).
Every function works without a process group (one process): it then does no communication.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional

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


@functools.cache
def _functional_all_gather() -> Optional[Callable[..., Tensor]]:
    """torch's functional all-gather with autograd: ``all_gather_single_autograd`` (the
    older ``all_gather_tensor_autograd`` where that is missing), or None on a torch with
    neither."""
    try:
        from torch.distributed import _functional_collectives as funcol
    except ImportError:  # torch built without distributed support
        return None
    gather = getattr(funcol, "all_gather_single_autograd", None)
    return gather or getattr(funcol, "all_gather_tensor_autograd", None)


def gather_with_grad(x: Tensor, functional: Optional[bool] = None) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0; the backward pass sums gradients over ranks.

    Rank ``r``'s gradient is the sum over ranks of the gradient of its slice, which is what
    DDP's averaging expects (the same as ``lightly.utils.dist.gather``). It uses torch's
    functional collective (traceable by ``torch.compile``) where torch has one with autograd,
    else ``torch.distributed.nn.functional.all_gather`` (``functional=False`` forces that
    call; deprecated from torch 2.14). One process: ``x`` itself.
    """
    if not is_distributed():
        return x
    gather = _functional_all_gather() if functional is not False else None
    if gather is not None:
        return gather(x.contiguous(), 0, torch_dist.group.WORLD)
    from torch.distributed.nn import functional as dist_fn

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional", FutureWarning)
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


# ----------------------------------------------------------------- exchanges of the sharded state
def backend_has_all_to_all(device: torch.device) -> bool:
    """Whether the default group's backend runs ``all_to_all_single`` on tensors of ``device``.

    NCCL (CUDA tensors), MPI, and Gloo on CPU tensors do; Gloo on CUDA tensors does not. A group
    made without a backend (``"cpu:gloo,cuda:nccl"``) answers for the backend of ``device``'s type.
    """
    backend = str(torch_dist.get_backend()).lower()
    if ":" in backend:  # e.g. "cpu:gloo,cuda:nccl"
        per_device = dict(part.split(":", 1) for part in backend.split(","))
        backend = per_device.get(device.type, "")
    if backend == "gloo":
        return device.type == "cpu"
    return backend in ("nccl", "mpi")


def all_to_all_counts(send_counts: Tensor) -> Tensor:
    """``recv[s]``: how many entries rank ``s`` sends to this rank, given ``send_counts[d]``.

    ``send_counts`` is an int64 tensor of ``world_size`` entries (one per destination); a
    collective (``all_to_all_single``): every rank must call it.
    """
    received = torch.empty_like(send_counts)
    torch_dist.all_to_all_single(received, send_counts.contiguous())
    return received


def all_to_all_variable(x: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
    """Sends ``x``'s rows ``[sum(send_counts[:d]), ...)`` to rank ``d``; returns what arrived.

    The rows from rank 0 come first, then rank 1's, each in the order they were sent. A
    collective: every rank must call it with matching counts (see :func:`all_to_all_counts`).
    """
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    torch_dist.all_to_all_single(
        out, x.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts
    )
    return out


def all_to_all_equal(x: Tensor) -> Tensor:
    """Block ``d`` of ``x`` (``x.shape[0] / world_size`` rows each) goes to rank ``d``; returns
    the blocks received, rank 0's first. Equal blocks need no counts on the host (no device
    synchronisation); every rank must call it with the same shape."""
    out = torch.empty_like(x)
    torch_dist.all_to_all_single(out, x.contiguous())
    return out


def all_gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's ``n`` (e.g. its batch size), in rank order (a collective)."""
    local = torch.tensor([n], dtype=torch.long, device=device)
    return concat_all_gather(local).tolist()


def all_gather_known_sizes(x: Tensor, sizes: list[int]) -> list[Tensor]:
    """Every rank's ``x`` (rank ``r``'s has ``sizes[r]`` rows), in rank order.

    ``all_gather`` needs equal shapes, so each rank pads to ``max(sizes)`` rows and the padding is
    cut off afterwards. A collective: every rank must call it with the same ``sizes``.
    """
    if not is_distributed():
        return [x]
    longest = max(sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    output = [torch.empty_like(padded) for _ in sizes]
    torch_dist.all_gather(output, padded)
    return [part[:size] for part, size in zip(output, sizes)]


def all_gather_variable(x: Tensor) -> list[Tensor]:
    """Every rank's ``x``, in rank order, when ranks may hold different numbers of rows."""
    if not is_distributed():
        return [x]
    return all_gather_known_sizes(x, all_gather_sizes(x.shape[0], x.device))


def barrier() -> None:
    """Waits for every rank (nothing without a process group)."""
    if is_distributed():
        torch_dist.barrier()
