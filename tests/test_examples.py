"""The programs in ``examples/`` run as a user runs them, on tiny data through their own options.

Each example is started as its own process (``python examples/...py --fake-data N --epochs 2 ...``,
``bash examples/openclip/train.sh ...``); nothing in it is patched. The assertions check what the
run must have produced: the epochs' output, the saved per-sample state, Lightning's checkpoint.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _dist_utils import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
TINY_RUN = ["--epochs", "2", "--batch-size", "8", "--num-workers", "0"]


def run(command: list[str], cwd: Path, timeout: int = 500) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        OMP_NUM_THREADS="1",
        PYTHON=sys.executable,
    )
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def python_example(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, str(EXAMPLES / name), *args], cwd)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["isogclr", "sogclr"])
def test_plain_example_trains_and_saves_the_state(loss: str, tmp_path: Path) -> None:
    result = python_example(
        "lightly/simclr.py", "--loss", loss, "--fake-data", "32", *TINY_RUN, cwd=tmp_path
    )
    assert "epoch: 00" in result.stdout and "epoch: 01" in result.stdout
    saved = torch.load(tmp_path / "simclr.pt", weights_only=False)
    log_u = saved["loss"]["state.log_u"]
    assert log_u.shape == (32,)
    assert torch.isfinite(log_u).all()  # every sample was visited (drop_last keeps all 32)
    if loss == "isogclr":
        tau = saved["loss"]["state.tau"]
        assert not torch.allclose(tau, torch.full_like(tau, 0.1))  # the temperatures moved


@pytest.mark.slow
def test_plain_example_on_an_image_folder(tmp_path: Path) -> None:
    """``--image-folder``: ``IndexedDataset(LightlyDataset(folder))``, four fields per item."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(24):
        Image.new("RGB", (32, 32), (i * 10 % 256, i * 40 % 256, 255 - i * 10)).save(
            folder / f"img{i:02d}.png"
        )
    result = python_example(
        "lightly/simclr.py", "--image-folder", str(folder), *TINY_RUN, cwd=tmp_path
    )
    assert "epoch: 01" in result.stdout
    saved = torch.load(tmp_path / "simclr.pt", weights_only=False)
    assert saved["loss"]["state.tau"].shape == (24,)


@pytest.mark.slow
def test_lightning_example_checkpoint_holds_the_tables(tmp_path: Path) -> None:
    args = ["--fake-data", "32", *TINY_RUN, "--checkpoint-dir", str(tmp_path / "runs")]
    result = python_example("lightly/simclr_lightning.py", *args, cwd=tmp_path)
    assert "max_epochs=2" in result.stdout + result.stderr
    (checkpoint,) = (tmp_path / "runs").rglob("*.ckpt")
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert state["criterion.state.tau"].shape == (32,)
    assert torch.isfinite(state["criterion.state.log_u"]).all()


@pytest.mark.slow
@pytest.mark.parametrize(("loss", "layout"), [("isogclr", "replicated"), ("sogclr", "sharded")])
def test_lightning_distributed_example_two_cpu_processes(
    loss: str, layout: str, tmp_path: Path
) -> None:
    args = ["--loss", loss, "--state-layout", layout, "--fake-data", "32", *TINY_RUN]
    args += ["--accelerator", "cpu", "--devices", "2"]
    result = python_example("lightly/simclr_lightning_distributed.py", *args, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert "max_epochs=2" in output
    assert "GLOBAL_RANK: 1" in output or "world_size=2" in output.replace(" ", "")


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def tiny_clip_config(directory: Path) -> Path:
    import json

    path = directory / "tau-tiny-example.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


@pytest.mark.slow
def test_openclip_python_example(tmp_path: Path) -> None:
    config = tiny_clip_config(tmp_path)
    args = ["--model", "tau-tiny-example", "--model-config", str(config)]
    result = python_example("openclip/clip_loss.py", *args, cwd=tmp_path)
    loss, tau_p50, shape = result.stdout.strip().splitlines()[-1].split(" ", 2)
    assert math.isfinite(float(loss))
    # batch 8 with the CC3M rho (6 > log 7): the temperatures go to tau_min (0.005, in float32)
    assert float(tau_p50) == pytest.approx(0.005)
    assert shape == "torch.Size([2800000])"


@pytest.mark.slow
def test_openclip_train_script(tmp_path: Path) -> None:
    """``examples/openclip/train.sh`` on 48 pairs in 3 shards, the tiny model, one epoch."""
    from openclip_fixtures import shard_pattern, write_shards

    write_shards(tmp_path / "shards", 48, 16)
    pattern = shard_pattern(tmp_path / "shards", 3)
    config = tiny_clip_config(tmp_path)
    small = ["--model", "tau-tiny-example", "--add-model-config", str(config)]
    small += ["--batch-size", "16", "--epochs", "1", "--workers", "0", "--device", "cpu"]
    small += ["--precision", "fp32", "--report-to", "", "--logs", str(tmp_path / "logs")]
    small += ["--tau-rho", "0.5", "--warmup", "1"]
    run(["bash", str(EXAMPLES / "openclip" / "train.sh"), pattern, "48", *small], tmp_path)
    assert (tmp_path / "shards" / "key_index.txt").exists()
    checkpoint = tmp_path / "logs" / "cc3m-isogclr" / "checkpoints" / "epoch_1.pt"
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["loss_name"] == "isogclr"
    assert saved["loss_state_dict"]["state.tau_image"].shape == (48,)
