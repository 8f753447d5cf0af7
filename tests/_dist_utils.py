"""Runs the same training steps in one process and in a 2-process gloo group, for comparison.

The case runner here is used twice: by the test process itself on the global batch (world size
1, no process group), and by each spawned rank on its slice of that batch. Both build the same
tiny model and the same loss and feed the same inputs, so any difference comes from the
distributed code path (gathers, DDP averaging, state synchronisation).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch import distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from lightly_tau import DySTreSSLoss, ISogCLRLoss, SogCLRLoss
from openclip_tau import DySTreSSClipLoss, ISogCLRClipLoss, SogCLRClipLoss

NUM_SAMPLES = 24
LOCAL_BATCH = 6
IN_DIM, OUT_DIM = 10, 8
LEARNING_RATE = 0.5
UNIMODAL = ("sogclr", "isogclr", "dystress")
IMAGE_TEXT = ("sogclr_clip", "isogclr_clip", "dystress_clip")
CASES = UNIMODAL + IMAGE_TEXT


def index_schedule(world_size: int = 2) -> list[Tensor]:
    """Global batch indices of each step: revisits (so gamma < 1 and the momentum act) and a
    step where one index sits on both ranks and another twice on rank 1."""
    g = torch.Generator().manual_seed(7)
    global_batch = LOCAL_BATCH * world_size
    steps = [torch.randperm(NUM_SAMPLES, generator=g)[:global_batch] for _ in range(4)]
    shared = steps[2].clone()
    shared[LOCAL_BATCH + 2] = shared[1]  # same index on rank 0 (position 1) and rank 1
    shared[LOCAL_BATCH + 4] = shared[LOCAL_BATCH + 0]  # twice on rank 1
    steps[2] = shared
    return steps


def build_loss(case: str, world_size: int, rank: int) -> nn.Module:
    if case == "sogclr":
        return SogCLRLoss(NUM_SAMPLES, temperature=0.2, gamma=0.7, gather_distributed=True)
    if case == "isogclr":
        return ISogCLRLoss(
            NUM_SAMPLES,
            rho=0.4,
            tau_init=0.2,
            eta=0.5,
            beta=0.6,
            gamma=0.7,
            gather_distributed=True,
        )
    if case == "dystress":
        return DySTreSSLoss(tau_min=0.1, tau_max=0.3, gather_distributed=True)
    clip_kwargs: dict[str, Any] = {"rank": rank, "world_size": world_size}
    if case == "sogclr_clip":
        return SogCLRClipLoss(NUM_SAMPLES, temperature=0.1, gamma=0.7, **clip_kwargs)
    if case == "isogclr_clip":
        return ISogCLRClipLoss(
            NUM_SAMPLES,
            rho=1.0,
            tau_init=0.1,
            tau_min=0.02,
            eta=0.2,
            beta=0.6,
            gamma=0.7,
            **clip_kwargs,
        )
    if case == "dystress_clip":
        return DySTreSSClipLoss(tau_min=0.05, tau_max=0.15, **clip_kwargs)
    raise ValueError(f"unknown case {case!r}")


class TwoTowers(nn.Module):
    """One linear map for both views (SimCLR), or one per tower and a logit scale (CLIP)."""

    def __init__(self, image_text: bool) -> None:
        super().__init__()
        self.first = nn.Linear(IN_DIM, OUT_DIM)
        self.second = nn.Linear(IN_DIM, OUT_DIM) if image_text else self.first
        self.logit_scale = nn.Parameter(torch.tensor(2.0)) if image_text else None

    def forward(self, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        return self.first(x0), self.second(x1), self.logit_scale


def run_case(case: str, rank: int, world_size: int) -> dict[str, Any]:
    """Trains the tiny model for the steps of ``index_schedule`` on this rank's batch slice.

    Returns each step's loss value, the gradient of the local inputs, the (DDP-averaged)
    parameter gradients, and the loss's state tables at the end.
    """
    torch.manual_seed(0)
    model = TwoTowers(image_text=case in IMAGE_TEXT)
    loss_fn = build_loss(case, world_size, rank)
    forward: nn.Module = model
    if world_size > 1:
        forward = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    inputs = torch.Generator().manual_seed(11)
    record: dict[str, Any] = {"loss": [], "input_grad": [], "param_grad": [], "objective": []}
    for global_index in index_schedule():
        global_x0 = torch.randn(len(global_index), IN_DIM, generator=inputs)
        global_x1 = torch.randn(len(global_index), IN_DIM, generator=inputs)
        local_batch = len(global_index) // world_size
        rows = slice(rank * local_batch, (rank + 1) * local_batch)
        x0 = global_x0[rows].clone().requires_grad_(True)
        x1 = global_x1[rows].clone().requires_grad_(True)
        index = global_index[rows]
        z0, z1, logit_scale = forward(x0, x1)
        if case in ("sogclr", "isogclr"):
            loss = loss_fn(z0, z1, index)
        elif case == "dystress":
            loss = loss_fn(z0, z1)
        else:
            loss = loss_fn(z0, z1, logit_scale, index=index)
        optimizer.zero_grad()
        loss.backward()
        record["loss"].append(loss.item())
        record["objective"].append(float(getattr(loss_fn, "stats", {}).get("objective", 0.0)))
        record["input_grad"].append(torch.cat([x0.grad, x1.grad], dim=1))
        record["param_grad"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        optimizer.step()
    state = getattr(loss_fn, "state", None)
    record["state"] = {} if state is None else {n: state.table(n) for n in state.names}
    return record


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(
    rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, args: tuple
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    torch_dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any], out_dir: Path, *args: Any, world_size: int = 2
) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes on the CPU.

    ``fn`` must be importable (module level). Returns each rank's result, in rank order.
    """
    torch.multiprocessing.spawn(
        _rank_entry,
        args=(fn, world_size, free_port(), str(out_dir), args),
        nprocs=world_size,
        join=True,
    )
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


def run_all_cases(rank: int, world_size: int, cases: tuple[str, ...]) -> dict[str, Any]:
    """Every case in one process group, so the process start-up is paid once."""
    return {case: run_case(case, rank, world_size) for case in cases}
