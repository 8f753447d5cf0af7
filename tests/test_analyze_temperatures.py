"""``python -m recipes.analyze_temperatures``: a user's checkpoint and image folder in, the
temperature histogram, extremes and temperature-against-density analysis out, each value checked
against a direct computation."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # recipes/ is run from the repository, not installed
    sys.path.insert(0, str(ROOT))

from lightly_tau import ISogCLRLoss  # noqa: E402
from recipes import analyze_temperatures as at  # noqa: E402
from recipes import temperature_report  # noqa: E402
from recipes.longtail.models import SimCLRModel  # noqa: E402

CLASSES = {"bird": 7, "cat": 5, "dog": 4}
SIZE = 16


def _folder(root: Path) -> tuple[Path, np.ndarray]:
    """An ImageFolder tree of grey images; returns it and the images in ImageFolder order."""
    rng = np.random.default_rng(0)
    ordered = []
    for name, count in CLASSES.items():
        (root / name).mkdir(parents=True)
        base = rng.integers(0, 256, (SIZE, SIZE))
        for k in range(count):
            noise = rng.integers(-40, 40, (SIZE, SIZE))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{k:02d}.png")
            ordered.append(pixels)
    return root, np.stack(ordered)


def _loss_state(n: int) -> tuple[dict, torch.Tensor]:
    loss = ISogCLRLoss(num_samples=n, rho=0.4)
    state = loss.state_dict()
    tau = torch.linspace(0.06, 0.9, n)[
        torch.randperm(n, generator=torch.Generator().manual_seed(1))
    ]
    state["state.tau"] = tau.clone()
    return state, tau


def _density(x: np.ndarray, k: int) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return np.sort(sims, axis=1)[:, ::-1][:, :k].mean(axis=1)


def _read(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_recipe_checkpoint_and_folder(tmp_path: Path) -> None:
    folder, pixels = _folder(tmp_path / "images")
    n = len(pixels)
    state, tau = _loss_state(n)
    torch.manual_seed(0)
    model = SimCLRModel("convnet", 1, SIZE, 32, 8)
    settings = {"backbone": "convnet", "hidden_dim": 32, "output_dim": 8}
    checkpoint = tmp_path / "run.pt"
    torch.save({"model": model.state_dict(), "loss": state, "settings": settings}, checkpoint)
    output = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--images", str(folder), "--output", str(output)]
    assert at.main(argv + ["--k", "3", "--extremes", "2"]) == 0

    rows = _read(output / "per_sample.csv")
    assert [r["file"] for r in rows] == [
        f"{c}/{k:02d}.png" for c, m in CLASSES.items() for k in range(m)
    ]
    np.testing.assert_allclose([float(r["tau"]) for r in rows], tau.numpy(), rtol=1e-6)
    # Pixel density: centred, L2-normalised pixels, mean cosine of the 3 nearest other images.
    x = pixels.reshape(n, -1).astype(np.float64) / 255.0
    x = x - x.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(
        [float(r["density_pixels"]) for r in rows], _density(x, 3), atol=1e-5
    )
    # Feature density: the backbone's features of images standardised by their own statistics.
    images = torch.from_numpy(pixels).float().unsqueeze(1) / 255.0
    standard = (images - images.mean()) / images.std()
    with torch.no_grad():  # in evaluation mode: batch norm with its running statistics
        features = model.eval().features(standard).numpy()
    np.testing.assert_allclose(
        [float(r["density_features"]) for r in rows], _density(features, 3), atol=1e-5
    )
    extremes = _read(output / "extremes.csv")
    order = np.argsort(-tau.numpy())
    assert [int(r["index"]) for r in extremes] == [*order[:2], *order[::-1][:2]]
    summary = (output / "summary.md").read_text()
    assert "class size" in summary and "local density, features" in summary
    for name in (
        "temperature_histogram.png",
        "temperature_vs_density.png",
        "temperature_extremes.png",
    ):
        assert (output / name).read_bytes()[:4] == b"\x89PNG"


def test_generic_checkpoint_with_a_saved_backbone_and_a_flat_folder(tmp_path: Path) -> None:
    folder, pixels = _folder(tmp_path / "nested")
    flat = tmp_path / "flat"
    flat.mkdir()
    for k, image in enumerate(pixels):
        Image.fromarray(image, mode="L").save(flat / f"{k:03d}.png")
    state, tau = _loss_state(len(pixels))
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE, 6))
    checkpoint = tmp_path / "generic.pt"
    torch.save({"criterion": state, "backbone": backbone}, checkpoint)
    output = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--images", str(flat), "--output", str(output)]
    assert at.main(argv + ["--k", "2", "--channels", "1"]) == 0
    rows = _read(output / "per_sample.csv")
    assert len(rows) == len(pixels) and {r["class"] for r in rows} == {"flat"}
    assert "class size" not in (output / "summary.md").read_text()  # one class: no class sizes


def test_bad_inputs_name_the_problem(tmp_path: Path, capsys) -> None:
    folder, pixels = _folder(tmp_path / "images")
    state, _ = _loss_state(len(pixels) + 1)
    checkpoint = tmp_path / "wrong.pt"
    torch.save({"loss": state}, checkpoint)
    argv = [
        "--checkpoint",
        str(checkpoint),
        "--images",
        str(folder),
        "--output",
        str(tmp_path / "o"),
    ]
    with pytest.raises(SystemExit) as exit_info:
        at.main(argv)
    assert exit_info.value.code == 2
    assert (
        "holds 16 images but the temperature table 'loss/state.tau' has 17"
        in capsys.readouterr().err
    )
    torch.save({"loss": {"weight": torch.ones(3)}}, checkpoint)
    with pytest.raises(SystemExit):
        at.main(argv)
    assert "no per-sample temperature table" in capsys.readouterr().err
    with pytest.raises(at.AnalysisError, match="several temperature tables"):
        temperature_report.find_temperatures(
            {"a.tau": torch.ones(2), "loss": {"state.tau": torch.ones(2)}}
        )
    assert (
        temperature_report.find_temperatures({"a.tau": torch.ones(2), "b": 1}, None)[0] == "a.tau"
    )
