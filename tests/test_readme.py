"""Every Python block of the README runs as written, each as its own program.

The blocks are Lightly's and OpenCLIP's examples with this project's changes; here they run on
tiny data: ``torchvision.datasets.CIFAR10`` becomes ``FakeData`` (64 images, nothing downloaded),
data loaders take batches of 16 in the main process, a Lightning ``Trainer`` runs on the CPU
(two processes with gloo where the block asks for DDP, two epochs), and a loop over epochs stops
after two. Nothing else of a block changes, so a snippet that crashes fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _dist_utils import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"

SITECUSTOMIZE = textwrap.dedent(
    '''
    """Test harness for README blocks: tiny data, CPU, short runs (see tests/test_readme.py)."""
    import builtins
    import functools
    import inspect
    import os

    import torch
    import torch.utils.data
    import torchvision

    IMAGES = int(os.environ.get("README_TEST_IMAGES", "64"))


    def _fake_cifar10(root=None, train=True, transform=None, target_transform=None, download=False):
        return torchvision.datasets.FakeData(
            size=IMAGES, image_size=(3, 32, 32), num_classes=10, transform=transform,
            target_transform=target_transform, random_offset=0 if train else IMAGES,
        )


    torchvision.datasets.CIFAR10 = _fake_cifar10

    _loader_init = torch.utils.data.DataLoader.__init__
    _loader_signature = inspect.signature(_loader_init)


    @functools.wraps(_loader_init)
    def _small_loader_init(self, *args, **kwargs):
        bound = _loader_signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        if arguments["batch_size"] and arguments["batch_sampler"] is None:
            arguments["batch_size"] = min(arguments["batch_size"], 16)
        arguments["num_workers"] = 0
        arguments["persistent_workers"] = False
        arguments["prefetch_factor"] = None
        _loader_init(*bound.args, **bound.kwargs)


    torch.utils.data.DataLoader.__init__ = _small_loader_init

    _range = builtins.range


    def _short_range(*args):
        # ``for epoch in range(10)``: two epochs are enough to run every line.
        if len(args) == 1 and args[0] == 10:
            return _range(2)
        return _range(*args)


    builtins.range = _short_range

    try:
        import pytorch_lightning as pl
    except ImportError:
        pl = None
    if pl is not None:
        _init = pl.Trainer.__init__

        def _cpu_trainer(self, *args, **kwargs):
            ddp = "ddp" in str(kwargs.get("strategy", ""))
            kwargs.update(accelerator="cpu", devices=2 if ddp else 1, sync_batchnorm=False)
            kwargs["max_epochs"] = min(kwargs.get("max_epochs", 2), 2)
            kwargs.update(logger=False, enable_checkpointing=False, enable_progress_bar=False)
            _init(self, *args, **kwargs)

        pl.Trainer.__init__ = _cpu_trainer
    '''
)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


BLOCKS = python_blocks(README.read_text())


def run_block(code: str, workdir: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    harness = workdir / "harness"
    harness.mkdir(exist_ok=True)
    (harness / "sitecustomize.py").write_text(SITECUSTOMIZE)
    script = workdir / "snippet.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(harness), str(REPO_ROOT)])
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_readme_has_the_examples() -> None:
    joined = "\n".join(BLOCKS)
    assert len(BLOCKS) >= 3
    assert "for batch in dataloader" in joined and "pl.Trainer(" in joined
    assert 'strategy="ddp"' in joined and "IndexedCollate(MultiViewCollate())" in joined


@pytest.mark.slow
@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_block_runs(number: int, tmp_path: Path) -> None:
    result = run_block(BLOCKS[number], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.mark.slow
def test_pytorch_example_with_a_lightly_dataset_folder(tmp_path: Path) -> None:
    """The plain example with ``IndexedDataset(LightlyDataset(folder))``: four fields per item."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(40):
        color = (i * 6 % 256, i * 40 % 256, 255 - i * 6 % 256)
        Image.new("RGB", (32, 32), color).save(folder / f"img{i:02d}.png")
    block = next(b for b in BLOCKS if "for batch in dataloader" in b)
    folder_line = f'dataset = LightlyDataset("{folder}", transform=transform)\n'
    code = block.replace(
        '# dataset = LightlyDataset("path/to/folder", transform=transform)\n', folder_line
    ).replace("import torch\n", "import torch\nfrom lightly.data import LightlyDataset\n", 1)
    assert folder_line in code
    result = run_block(code, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "epoch: 01" in result.stdout


# The Lightning-distributed example with each stateful loss in place of ISogCLRLoss; a trained
# temperature takes the documented configure_optimizers (its own group, schedule and clamp).
STATEFUL_SWAPS = {
    "SogCLRLoss": ("SogCLRLoss(num_samples, gather_distributed=True)", False),
    "RGCLGLoss": ("RGCLGLoss(num_samples, gather_distributed=True)", True),
    "TempNetLoss": ("TempNetLoss(num_samples, dim=2048, gather_distributed=True)", True),
}


@pytest.mark.slow
@pytest.mark.parametrize("loss", sorted(STATEFUL_SWAPS))
def test_lightning_distributed_example_with_each_stateful_loss(loss: str, tmp_path: Path) -> None:
    block = next(b for b in BLOCKS if 'strategy="ddp"' in b)
    construction, trained = STATEFUL_SWAPS[loss]
    code = block.replace("ISogCLRLoss(num_samples, gather_distributed=True)", construction)
    code = code.replace("IndexedDataset, ISogCLRLoss", f"IndexedDataset, ISogCLRLoss, {loss}")
    if trained:
        code = code.replace(
            "optim = torch.optim.SGD(self.parameters(), lr=0.06)",
            "optim = self.criterion.optimizer(self.parameters(), lr=0.06)",
        )
        assert "self.criterion.optimizer(" in code
    assert construction in code
    result = run_block(code, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
