"""scripts/gpu_check.sh runs on a machine without a GPU in its dry mode and prints its summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests-collect", "benchmark-losses", "benchmark-compile", "openclip-throughput", "train")


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_step() -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = run.stdout.split("== gpu_check summary (dry run on CPU")[1].splitlines()[1:]
    assert [line.split()[:2] for line in summary[: len(STEPS)]] == [[s, "PASS"] for s in STEPS]
    assert summary[-1] == "gpu_check: all passed"


def test_gpu_check_without_a_gpu_says_so() -> None:
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert run.returncode == 2
    assert "no CUDA device" in run.stderr and "--dry-run" in run.stderr
