"""The SimCLR example scripts train a few steps on real Fashion-MNIST images with every loss."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pytest
import torch

from lightly_tau import DySTreSSLoss, ISogCLRLoss, RGCLGLoss, SogCLRLoss, TempNetLoss
from recipes.simclr import simclr, simclr_lightning
from recipes.simclr.common import LOSSES, PROJECTION_DIM, RunResult, prepare_fashion_mnist

SCRIPTS: dict[str, Callable[[list[str]], RunResult]] = {
    "pytorch": simclr.main,
    "lightning": simclr_lightning.main,
}
NUM_IMAGES = 256
BATCH_SIZE = 32
STEPS = 3


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fashion_mnist")
    prepare_fashion_mnist(root)
    return root


@pytest.fixture(autouse=True)
def restore_num_threads():
    # The scripts' --num-threads sets a process-wide value; restore it for later tests.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(script: str, args: list[str], data_root: Path, tmp_path: Path) -> RunResult:
    argv = ["--backbone", "convnet", "--data-root", str(data_root), "--num-threads", "1"]
    if script == "lightning":
        argv += ["--log-dir", str(tmp_path / "logs"), "--log-every", "1"]
    return SCRIPTS[script](argv + args)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("script", SCRIPTS)
def test_trains_with_each_loss(script: str, loss: str, data_root: Path, tmp_path: Path) -> None:
    args = ["--loss", loss, "--num-samples-limit", str(NUM_IMAGES)]
    args += ["--batch-size", str(BATCH_SIZE), "--max-steps", str(STEPS)]
    result = run(script, args, data_root, tmp_path)

    assert len(result.losses) == STEPS
    assert all(math.isfinite(value) for value in result.losses)
    # Shuffled without replacement within the epoch: every step brings new images.
    visited = result.visited
    assert visited.shape == (NUM_IMAGES,)
    assert int(visited.sum()) == STEPS * BATCH_SIZE

    criterion = result.criterion
    expected_type = {
        "sogclr": SogCLRLoss,
        "isogclr": ISogCLRLoss,
        "rgclg": RGCLGLoss,
        "tempnet": TempNetLoss,
        "dystress": DySTreSSLoss,
    }
    if loss in expected_type:
        assert isinstance(criterion, expected_type[loss])
        assert result.stats and all(math.isfinite(v) for v in result.stats.values())
    if loss in ("sogclr", "isogclr", "rgclg", "tempnet"):
        assert criterion.num_samples == NUM_IMAGES
        # The last step's value is the objective estimate, not the surrogate.
        assert result.losses[-1] == pytest.approx(result.stats["objective"], abs=1e-6)
        log_u = criterion.state.table("log_u")
        assert torch.isfinite(log_u[visited]).all()
        assert torch.isneginf(log_u[~visited]).all()
    if loss == "isogclr":
        tau, momentum = criterion.state.table("tau"), criterion.state.table("momentum")
        tau_init = criterion.settings.tau_init
        assert (tau[visited] != tau_init).all() and (momentum[visited] != 0).all()
        assert (tau[~visited] == tau_init).all() and (momentum[~visited] == 0).all()
        assert criterion.settings.tau_min <= float(tau.min()) <= float(tau.max()) <= 1.0
    if loss == "rgclg":
        # The temperature's own AdamW moved the global temperature away from its start.
        assert criterion.temperature != pytest.approx(0.1, abs=1e-7)
        # by AdamW's steps (each at most about lr_tau), not by the model's SGD at lr 0.06
        moved = abs(float(criterion.logit_scale) - math.log(10.0))
        assert moved <= STEPS * criterion.lr_tau * 1.01
    if loss == "tempnet":
        # The network is built from a fixed seed: training moved its parameters.
        fresh = TempNetLoss(NUM_IMAGES, dim=PROJECTION_DIM)
        moved = [
            not torch.equal(a.detach().cpu(), b)
            for a, b in zip(criterion.temperature_parameters(), fresh.temperature_parameters())
        ]
        assert any(moved)


@pytest.mark.parametrize("script", SCRIPTS)
def test_loss_flags_and_epochs_reach_the_loss(script: str, data_root: Path, tmp_path: Path) -> None:
    # 64 images in batches of 16: 4 steps an epoch, so the 6th step runs in epoch 1.
    args = ["--loss", "isogclr", "--num-samples-limit", "64", "--batch-size", "16"]
    args += ["--max-steps", "6", "--rho", "0.5", "--tau-init", "0.2", "--tau-min", "0.1"]
    args += ["--eta", "0.1", "--beta", "0.9", "--gamma", "0.6", "--gamma-decay-epochs", "4"]
    result = run(script, args, data_root, tmp_path)
    criterion = result.criterion
    settings = criterion.settings
    assert (settings.rho, settings.tau_init, settings.tau_min) == (0.5, 0.2, 0.1)
    assert (settings.eta, settings.beta, criterion.gamma) == (0.1, 0.9, 0.6)
    assert criterion.epoch == 1  # set_epoch was called at the start of the second epoch
    assert criterion.current_gamma == pytest.approx(0.6 + 0.4 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert not criterion.gather_distributed
    assert int(result.visited.sum()) == 64


def test_lightning_logs_loss_and_stats_to_tensorboard(data_root: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["--loss", "isogclr", "--num-samples-limit", "64", "--batch-size", "16"]
    run("lightning", args + ["--max-steps", "2"], data_root, tmp_path)
    (event_file,) = (tmp_path / "logs").rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/objective", "train/tau_mean", "train/tau_p90"} <= tags
    assert len(events.Scalars("train/tau_mean")) == 2


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_bad_flags(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script](["--help"])
    assert exit_info.value.code == 0
    assert "--loss {ntxent,sogclr,isogclr,rgclg,tempnet,dystress}" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script](["--loss", "ntxent", "--rho", "0.3"])
    assert exit_info.value.code == 2
    assert "--rho do not apply to --loss ntxent" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        SCRIPTS[script](["--loss", "sogclr", "--batch-size", "0"])
    assert "--batch-size:\n  Not of type PositiveInt" in capsys.readouterr().err


def test_missing_fashion_mnist_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "root", source_dir=tmp_path / "empty")
    assert not (tmp_path / "root").exists()
