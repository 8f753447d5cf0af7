"""No deprecation warnings from the project's calls, and no log lines of torch's own.

The test configuration turns every warning attributed to ``tau_core``, ``lightly_tau`` or
``openclip_tau`` into an error (``filterwarnings`` in pyproject.toml), so a deprecated call in the
project (or one of ours) fails the test that makes it. Here: the gathers (functional collectives,
with the old autograd gather as fallback, both giving the same gradients on two gloo ranks), and
the console of ``python -m openclip_tau.train``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _dist_utils import run_on_ranks
from openclip_fixtures import TINY_MODEL, write_tiny_model_config

from tau_core import distributed

ROWS, DIM = 3, 4
# torch's own log format ("I1203 13:36:21.182000 16767 .../fake_tensor.py:3778] ...").
TORCH_LOG_LINE = re.compile(r"^[DIWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ")


def test_project_warnings_are_errors_in_the_tests() -> None:
    with pytest.raises(UserWarning):
        warnings.warn_explicit("x", UserWarning, "tau_core/losses.py", 1, module="tau_core.losses")


def gather_gradients(rank: int, world_size: int) -> dict[str, object]:
    """Each rank gathers its rows (functional collective, then the old call) and takes the
    gradient of one weighted sum of the gathered rows."""
    weights = torch.arange(world_size * ROWS * DIM, dtype=torch.float64).view(-1, DIM)
    result: dict[str, object] = {}
    for name, functional in (("functional", None), ("fallback", False)):
        x = torch.full((ROWS, DIM), float(rank + 1), dtype=torch.float64, requires_grad=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gathered = distributed.gather_with_grad(x, functional=functional)
            (grad,) = torch.autograd.grad((gathered * weights).sum(), x)
        result[name] = (gathered.detach().clone(), grad)
        result[name + "_warnings"] = [str(w.message) for w in caught]
    result["has_functional"] = distributed._functional_all_gather() is not None
    return result


@pytest.mark.slow
def test_gathers_warn_nothing_and_sum_gradients_over_two_ranks(tmp_path: Path) -> None:
    world = 2
    weights = torch.arange(world * ROWS * DIM, dtype=torch.float64).view(-1, DIM)
    expected_rows = torch.cat([torch.full((ROWS, DIM), float(r + 1)) for r in range(world)])
    for rank, result in enumerate(run_on_ranks(gather_gradients, tmp_path, world_size=world)):
        assert result["has_functional"]  # torch 2.14 has all_gather_single_autograd
        assert result["functional_warnings"] == [] and result["fallback_warnings"] == []
        for name in ("functional", "fallback"):
            gathered, grad = result[name]
            torch.testing.assert_close(gathered, expected_rows.double())
            # Every rank's sum uses rank r's rows with weights[r]: the gradient is world * w_r.
            torch.testing.assert_close(grad, world * weights[rank * ROWS : (rank + 1) * ROWS])


def test_one_process_gather_is_the_tensor_itself() -> None:
    x = torch.ones(2, 3, requires_grad=True)
    assert distributed.gather_with_grad(x) is x


def run_train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    config = write_tiny_model_config(tmp_path)
    command = [sys.executable, "-m", "openclip_tau.train", "--add-model-config", str(config)]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )


def torch_lines(output: str) -> list[str]:
    return [
        line
        for line in output.splitlines()
        if TORCH_LOG_LINE.match(line) or "FakeTensor cache stats" in line or "TorchDynamo" in line
    ]


def test_train_console_has_no_torch_log_lines(tmp_path: Path) -> None:
    run = run_train(
        tmp_path,
        *("--loss", "sogclr", "--model", TINY_MODEL, "--dataset-type", "synthetic"),
        *("--train-num-samples", "16", "--batch-size", "8", "--epochs", "0", "--device", "cpu"),
        *("--logs", str(tmp_path / "logs"), "--workers", "0"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    output = run.stdout + run.stderr
    assert "openclip_tau: --loss sogclr" in output  # our lines are still there, at INFO
    assert torch_lines(output) == []


def test_train_that_fails_at_parse_time_ends_with_its_error(tmp_path: Path) -> None:
    run = run_train(tmp_path, "--loss", "sogclr", "--tau-gamma", "2", "--model", TINY_MODEL)
    assert run.returncode == 2
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert torch_lines("\n".join(lines)) == []
    assert "gamma" in lines[-1] and "error" in lines[-1]
