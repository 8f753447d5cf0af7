"""Two gloo processes: state stays identical without ``gather_distributed``, and an error that one
rank finds is raised on every rank (no hang), with the state unchanged everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _dist_utils import run_on_ranks

from lightly_tau import DySTreSSLoss, ISogCLRLoss, SogCLRLoss
from openclip_tau import DySTreSSClipLoss, ISogCLRClipLoss

N, B, DIM = 32, 4, 6


def _losses(world_size: int, rank: int) -> dict[str, torch.nn.Module]:
    return {
        "isogclr_nogather": ISogCLRLoss(N, eta=0.2, gather_distributed=False),
        "sogclr_gather": SogCLRLoss(N, gather_distributed=True),
        "isogclr_clip": ISogCLRClipLoss(N, tau_init=0.1, rank=rank, world_size=world_size),
        "dystress_gather": DySTreSSLoss(gather_distributed=True),
        "dystress_clip": DySTreSSClipLoss(rank=rank, world_size=world_size),
    }


def _call(name: str, loss, z0, z1, index):
    if "clip" in name:
        return loss(z0, z1, torch.tensor(10.0), index=index)
    return loss(z0, z1, index)


def _tables(loss) -> dict[str, torch.Tensor]:
    state = getattr(loss, "state", None)
    return {} if state is None else {n: state.table(n) for n in state.names}


def _features(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z0, z1 = torch.randn(B, DIM, generator=g), torch.randn(B, DIM, generator=g)
    return z0.requires_grad_(), z1.requires_grad_()


def rank_cases(rank: int, world_size: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, loss in _losses(world_size, rank).items():
        record: dict[str, Any] = {"errors": []}
        # Two good steps: each rank its own indices (rank r: r*B ... r*B + B - 1, then +2B).
        for step in range(2):
            index = torch.arange(B) + rank * B + step * world_size * B
            _call(name, loss, *_features(10 * step + rank), index).backward()
        record["trained"] = _tables(loss)
        # Bad batches, each found on one rank only: every rank must raise, nothing may change.
        bad_cases = {
            "nan": (1, "nan"),
            "index_range": (0, "range"),
            "index_length": (1, "length"),
        }
        for label, (bad_rank, kind) in bad_cases.items():
            if kind != "nan" and not hasattr(loss, "state"):
                continue
            z0, z1 = _features(100 + rank)
            index = torch.arange(B) + rank * B
            if rank == bad_rank:
                if kind == "nan":
                    z0 = z0.detach().clone()
                    z0[0, 0] = float("nan")
                    z0.requires_grad_()
                elif kind == "range":
                    index = index + N
                else:
                    index = index[:-1]
            try:
                _call(name, loss, z0, z1, index)
                record["errors"].append((label, None))
            except ValueError as err:
                record["errors"].append((label, str(err)))
        record["after"] = _tables(loss)
        result[name] = record
    return result


@pytest.mark.slow
def test_state_sync_and_errors_agreed_by_both_ranks(tmp_path: Path) -> None:
    ranks = run_on_ranks(rank_cases, tmp_path)  # a hang would fail by the test timeout
    for name in ranks[0]:
        r0, r1 = ranks[0][name], ranks[1][name]
        # Identical state on both ranks, whatever gather_distributed says.
        for table in r0["trained"]:
            assert torch.equal(r0["trained"][table], r1["trained"][table]), (name, table)
            assert torch.equal(r0["after"][table], r1["after"][table]), (name, table)
            assert torch.equal(r0["trained"][table], r0["after"][table]), (name, table)
        if r0["trained"]:
            log_u = next(v for k, v in r0["trained"].items() if k.startswith("log_u"))
            # Rows of both ranks' samples (steps 0 and 1) were written on rank 0.
            visited = torch.cat([torch.arange(2 * B), torch.arange(2 * B) + 2 * B])
            assert torch.isfinite(log_u[visited]).all(), name
            assert torch.isneginf(log_u[4 * B :]).all(), name
        # Every bad batch raised on both ranks.
        for (label, e0), (_, e1) in zip(r0["errors"], r1["errors"]):
            assert e0 is not None and e1 is not None, (name, label, e0, e1)
            if label == "nan":
                assert "NaN" in e0 and "NaN" in e1
            if label == "index_range":
                assert "out of range" in e0 and "out of range" in e1
            if label == "index_length":
                assert "entries but the batch has" in e1
                assert "rank 1 stopped the step" in e0
