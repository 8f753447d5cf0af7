"""Runs the trained-temperature examples as a user would: the plain loop, the Lightning version
resumed from a checkpoint (bit-identical to the uninterrupted run), and the sharded layout in
a 2-process Lightning DDP run (gloo) resumed with ShardedStateCheckpoint."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PLAIN = ROOT / "examples" / "lightly" / "trained_temperature.py"
LIGHTNING = ROOT / "examples" / "lightly" / "trained_temperature_lightning.py"
TINY = ["--fake-data", "--backbone", "tiny", "--num-samples", "64", "--input-size", "32"]
DDP = ["--devices", "2", "--strategy", "ddp", "--accelerator", "cpu"]
COLLAPSED = 0.9  # mean pairwise cosine of collapsed projections


def run(script: Path, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=False)


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Every tensor bit for bit (NaN where NaN), every other value equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{k}]")
    elif torch.is_tensor(a):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    else:
        assert a == b, where


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["rgclg", "tempnet"])
def test_plain_loop_example_trains_the_temperature_beside_sgd(tmp_path: Path, loss: str):
    out = run(PLAIN, *TINY, "--batch-size", "16", "--epochs", "2", "--loss", loss, cwd=tmp_path)
    assert "not stepped by their own optimizer" not in out
    cosine = float(re.search(r"mean pairwise cosine of the projections: (-?[\d.]+)", out)[1])
    assert cosine < 0.7 * COLLAPSED
    p50 = [float(v) for v in re.findall(r"tau p50 ([\d.]+)", out)]
    assert len(p50) == 2 and all(0.05 <= v <= 1.0 for v in p50)


@pytest.mark.slow
def test_lightning_example_resume_is_bit_identical(tmp_path: Path):
    """TempNet (dropout 0.5 from its own stream) with SGD: 2 epochs, against 1 epoch, a
    checkpoint and 1 more epoch resumed: weights, tables, both optimizers bit for bit."""
    args = [*TINY, "--batch-size", "16", "--loss", "tempnet"]
    out = run(LIGHTNING, *args, "--epochs", "2", "--save-result", "full", cwd=tmp_path)
    assert "not stepped by their own optimizer" not in out
    run(LIGHTNING, *args, "--epochs", "1", "--ckpt-dir", "ckpt", cwd=tmp_path)
    run(
        LIGHTNING,
        *args,
        *("--epochs", "2", "--ckpt-dir", "ckpt", "--resume", "last", "--save-result", "resumed"),
        cwd=tmp_path,
    )
    full, resumed = load(tmp_path / "full.rank0"), load(tmp_path / "resumed.rank0")
    assert_identical(full, resumed)
    adam = full["temperature_optimizer"]["optimizers"]["criterion"]
    assert adam["state"] and all(int(s["step"]) == 8 for s in adam["state"].values())
    assert full["optimizer"]["state"]  # the model's SGD momentum, compared above
    assert full["cosine"] < 0.7 * COLLAPSED


@pytest.mark.slow
def test_lightning_ddp_sharded_resume_equals_uninterrupted_and_replicated(tmp_path: Path):
    args = [*TINY, "--batch-size", "8", "--loss", "rgclg", *DDP]
    sharded = [*args, "--state-layout", "sharded"]
    run(LIGHTNING, *sharded, "--epochs", "2", "--save-result", "full", cwd=tmp_path)
    run(LIGHTNING, *args, "--epochs", "2", "--save-result", "replicated", cwd=tmp_path)
    run(LIGHTNING, *sharded, "--epochs", "1", "--ckpt-dir", "ckpt", cwd=tmp_path)
    folders = list((tmp_path / "ckpt").glob("loss-state-step*/criterion/index.json"))
    assert folders, "the shard folder beside the checkpoint"
    run(
        LIGHTNING,
        *sharded,
        *("--epochs", "2", "--ckpt-dir", "ckpt", "--resume", "last", "--save-result", "resumed"),
        cwd=tmp_path,
    )
    for rank in (0, 1):
        full = load(tmp_path / f"full.rank{rank}")
        assert_identical(full, load(tmp_path / f"resumed.rank{rank}"), f"rank {rank}")
        replicated = load(tmp_path / f"replicated.rank{rank}")
        assert_identical(full["tables"], replicated["tables"], f"tables, rank {rank}")
        model = {k: v for k, v in full["weights"].items() if ".state." not in k}
        assert_identical(
            model, {k: v for k, v in replicated["weights"].items() if ".state." not in k}
        )
        assert_identical(full["temperature_optimizer"], replicated["temperature_optimizer"])
    assert_identical(
        load(tmp_path / "full.rank0")["tables"], load(tmp_path / "full.rank1")["tables"]
    )
