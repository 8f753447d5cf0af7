"""A 2-process Lightning DDP run of the SimCLR example keeps ISogCLRLoss's state in sync.

Lightning's DDP re-broadcasts module buffers from rank 0 at every forward; a per-sample table
kept as a buffer and updated with each rank's own indices would lose rank 1's updates (or
differ between ranks). Here both ranks must end with identical tables that hold the updates of
every sample either rank trained on, and nothing else.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _dist_utils import free_port

from recipes.simclr.common import prepare_fashion_mnist

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES, BATCH_SIZE, STEPS, TAU_INIT = 128, 16, 3, 0.1


def run_lightning(tmp_path: Path, *options: str) -> list[dict]:
    """Each rank's saved tables and visited indices of a 2-process Lightning DDP run."""
    data_root, state_dir = tmp_path / "data", tmp_path / "state"
    prepare_fashion_mnist(data_root)  # once here, not by both ranks at the same time
    command = [sys.executable, "-m", "recipes.simclr.simclr_lightning", "--loss", "isogclr"]
    command += ["--tau-init", str(TAU_INIT), "--eta", "0.1", "--backbone", "convnet"]
    command += ["--num-samples-limit", str(NUM_IMAGES), "--batch-size", str(BATCH_SIZE)]
    command += ["--max-steps", str(STEPS), "--devices", "2", "--strategy", "ddp"]
    command += ["--accelerator", "cpu", "--num-threads", "1", "--data-root", str(data_root)]
    command += ["--log-dir", str(tmp_path / "logs"), "--loss-state-dir", str(state_dir)]
    command += list(options)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    process = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert "per-sample state: 3 tables x 128 samples" in process.stdout
    return [torch.load(state_dir / f"loss_state_rank{r}.pt") for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("gather", [True, False], ids=["gather_distributed", "no_gather"])
def test_lightning_ddp_keeps_isogclr_state_identical_on_both_ranks(
    tmp_path: Path, gather: bool
) -> None:
    """With and without gather_distributed: the flag chooses the negatives, never the state."""
    ranks = run_lightning(tmp_path, *([] if gather else ["--no-gather-distributed"]))
    tables = [r["tables"] for r in ranks]
    assert set(tables[0]) == {"log_u", "tau", "momentum"}
    for name in tables[0]:
        assert torch.equal(tables[0][name], tables[1][name]), f"{name} differs between ranks"

    visited = [r["visited"] for r in ranks]
    # DistributedSampler gives each rank its own half of the shuffled images.
    assert int(visited[0].sum()) == int(visited[1].sum()) == STEPS * BATCH_SIZE
    assert not (visited[0] & visited[1]).any()
    either = visited[0] | visited[1]
    log_u, tau, momentum = (tables[0][n] for n in ("log_u", "tau", "momentum"))
    # Rank 0's tables hold the updates of rank 1's samples, and only visited rows changed.
    assert torch.isfinite(log_u[visited[1]]).all()
    assert (tau[visited[1]] != TAU_INIT).all() and (momentum[visited[1]] != 0).all()
    assert torch.isfinite(log_u[either]).all() and (tau[either] != TAU_INIT).all()
    assert torch.isneginf(log_u[~either]).all()
    assert (tau[~either] == TAU_INIT).all() and (momentum[~either] == 0).all()


@pytest.mark.slow
def test_lightning_ddp_with_sharded_state_equals_replicated(tmp_path: Path) -> None:
    """Each rank holds half of the rows; gathered, they are the replicated run's tables."""
    replicated = run_lightning(tmp_path / "replicated")
    sharded = run_lightning(tmp_path / "sharded", "--state-layout", "sharded")
    for name, table in replicated[0]["tables"].items():
        for rank in range(2):
            assert torch.equal(sharded[rank]["tables"][name], table), (name, rank)
    # Each rank's own state_dict holds only its shard: rows i % 2 == rank.
    shard = sharded[1]["loss_state"]
    rows = [v for k, v in shard.items() if k.endswith("shard.tau")]
    assert len(rows) == 1 and rows[0].shape == (NUM_IMAGES // 2,)
    assert torch.equal(rows[0], replicated[0]["tables"]["tau"][1::2])
