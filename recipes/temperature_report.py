"""The pieces of :func:`recipes.analyze_temperatures.analyze_temperatures`: reading a
checkpoint's per-sample temperatures and the images they were learned from, the backbone's and
the pixels' features, the statistics (quantiles by class, Spearman correlations with
permutation p-values), the plots and the summary page.

Imported once a report is written: its libraries (numpy, pandas, scipy, torch) cost seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from recipes.analyze_temperatures import AnalysisError
from recipes.temperature_analysis import (
    QUANTILE_COLUMNS,
    plot_distribution_by_group,
    plot_temperature_vs_density,
    pyplot,
    quantiles,
    save_figure,
    spearman,
)

# torch.Tensor: torch is imported where it is used.
Tensor = Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------- inputs
def find_temperatures(checkpoint: Any, key: Optional[str] = None) -> tuple[str, Tensor]:
    """The per-sample temperature table in ``checkpoint`` and its key.

    Looks in ``checkpoint["loss"]``, ``checkpoint["criterion"]``, ``checkpoint["state_dict"]``
    and the top level for 1-D tensors under ``tau`` or a key ending in ``.tau``; ``key`` picks
    one by its full key. Raises :class:`AnalysisError` when there is none, or several and no
    ``key``.
    """
    import torch

    if not isinstance(checkpoint, Mapping):
        raise AnalysisError(f"--checkpoint must hold a dict, got {type(checkpoint).__name__}")
    found: dict[str, Tensor] = {}
    for prefix in ("loss", "criterion", "state_dict", None):
        table = checkpoint.get(prefix) if prefix else checkpoint
        if not isinstance(table, Mapping):
            continue
        for name, value in table.items():
            full = f"{prefix}/{name}" if prefix else str(name)
            is_tau = name == "tau" or str(name).endswith(".tau")
            if isinstance(value, torch.Tensor) and value.dim() == 1 and is_tau:
                found[full] = value.detach().float().cpu()
    if key is not None:
        if key not in found:
            raise AnalysisError(f"--tau-key {key!r} not found; temperature tables: {list(found)}")
        return key, found[key]
    if not found:
        raise AnalysisError(
            "--checkpoint holds no per-sample temperature table (a 1-D tensor under 'tau' or "
            "'*.tau' in 'loss', 'criterion', 'state_dict' or the top level); save "
            "{'loss': criterion.state_dict(), ...} with an ISogCLRLoss criterion"
        )
    if len(found) > 1:
        raise AnalysisError(f"several temperature tables {list(found)}: choose one with --tau-key")
    return next(iter(found.items()))


def list_images(folder: Path) -> tuple[list[Path], list[str], list[int]]:
    """Image files in ImageFolder order, class names, and each file's class index."""
    if not folder.is_dir():
        raise AnalysisError(f"--images {folder} is not a directory")

    def images_in(paths: Any) -> list[Path]:
        return sorted(p for p in paths if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files: list[Path] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        mine = images_in((folder / name).rglob("*"))
        files += mine
        labels += [c] * len(mine)
    if not classes:
        files, classes = images_in(folder.iterdir()), [folder.name]
        labels = [0] * len(files)
    if not files:
        raise AnalysisError(f"--images {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files, classes, labels


def load_images(files: Sequence[Path], size: int, channels: int) -> Tensor:
    """uint8 tensor (N, channels, size, size): each image resized (bilinear) to size x size."""
    import torch
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    out = torch.empty(len(files), channels, size, size, dtype=torch.uint8)
    for i, path in enumerate(files):
        with Image.open(path) as image:
            pixels = np.array(image.convert(mode).resize((size, size), Image.BILINEAR))
        out[i] = torch.from_numpy(pixels.reshape(size, size, channels)).permute(2, 0, 1)
    return out


def load_backbone(
    checkpoint: Mapping[str, Any], path: Optional[Path], image_size: Optional[int]
) -> tuple[Optional[Callable[[Tensor], Tensor]], Optional[int], Optional[int]]:
    """The feature extractor, its input channels and image size where the checkpoint says them.

    Order: ``path`` (TorchScript, else a whole pickled module), the long-tail recipe's ``model``
    with ``settings`` (its backbone features, not the projection head's output), a module under
    ``backbone``; None when there is none.
    """
    import torch

    if path is not None:
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError):
            module = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(module, torch.nn.Module):
            raise AnalysisError(f"--backbone {path} is not a module ({type(module).__name__})")
        return module.eval(), None, image_size
    settings, weights = checkpoint.get("settings"), checkpoint.get("model")
    if isinstance(weights, Mapping) and isinstance(settings, Mapping):
        from recipes.longtail.models import SimCLRModel

        convolutions = [v for v in weights.values() if isinstance(v, torch.Tensor) and v.dim() == 4]
        if not convolutions:
            raise AnalysisError(
                "the checkpoint's model has no convolution to read its input channels from"
            )
        channels, size = int(convolutions[0].shape[1]), image_size or 224
        model = SimCLRModel(
            settings["backbone"], channels, size, settings["hidden_dim"], settings["output_dim"]
        )
        model.load_state_dict(weights)
        return model.eval().features, channels, size
    if isinstance(checkpoint.get("backbone"), torch.nn.Module):
        return checkpoint["backbone"].eval(), None, image_size
    return None, None, image_size


def backbone_features(
    backbone: Callable[[Tensor], Tensor],
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch: int,
) -> np.ndarray:
    """Flattened, L2-normalised features of images scaled to [0, 1] and standardised."""
    import torch

    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = (images[start : start + batch].float() / 255.0 - mean_t) / std_t
            features = torch.flatten(backbone(x), 1).float()
            chunks.append(torch.nn.functional.normalize(features, dim=1))
    return torch.cat(chunks).numpy()


def pixel_features(images: Tensor, max_side: int = 32) -> np.ndarray:
    """Flattened, centred, L2-normalised pixels, downsampled to at most ``max_side`` px (as the
    long-tail recipe's raw-pixel reference)."""
    from torch.nn import functional as F

    x = images.float() / 255.0
    if x.shape[-1] > max_side:
        x = F.adaptive_avg_pool2d(x, max_side)
    x = x.flatten(start_dim=1)
    return F.normalize(x - x.mean(dim=1, keepdim=True), dim=1).numpy()


# --------------------------------------------------------------------------- analysis
def analyse(
    tau: np.ndarray,
    labels: Sequence[int],
    classes: Sequence[str],
    densities: Mapping[str, np.ndarray],
    permutations: int = 1000,
) -> dict[str, Any]:
    """Quantiles of ``tau`` (overall and per class) and Spearman over samples of ``tau`` against
    each density and, with several classes, against the size of each sample's class."""
    labels_a = np.asarray(labels)
    sizes = np.bincount(labels_a, minlength=len(classes))
    predictors = dict(densities)
    if len(classes) > 1:
        predictors["class size"] = sizes[labels_a].astype(np.float64)
    correlations = {}
    for name, values in predictors.items():
        rho, p = spearman(values, tau, permutations=permutations)
        correlations[name] = {"rho": rho, "p_value": p}
    return {
        "samples": int(len(tau)),
        "quantiles": quantiles(tau),
        "per_class": [
            {"class": name, "images": int(sizes[c]), **quantiles(tau[labels_a == c])}
            for c, name in enumerate(classes)
        ],
        "correlations": correlations,
    }


def format_number(value: Optional[float], digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or a dash for None and NaN."""
    return "–" if value is None or np.isnan(value) else f"{value:.{digits}f}"


def summary_markdown(
    checkpoint: Path, tau_key: str, images: Path, analysis: Mapping[str, Any], table: pd.DataFrame
) -> str:
    """``summary.md``: quantiles overall and per class, the correlations, the extremes."""
    rows = [{"class": "all", "images": analysis["samples"], **analysis["quantiles"]}]
    frame = pd.DataFrame(rows + list(analysis["per_class"]))
    for name in QUANTILE_COLUMNS:
        frame[name] = [format_number(v) for v in frame.get(name, pd.Series(np.nan, frame.index))]
    frame = frame[["class", "images", *QUANTILE_COLUMNS]].rename(columns={"class": ""})
    extremes_table = table[["end", "rank", "index", "file", "class"]].assign(
        tau=[f"{t:.4f}" for t in table["tau"]]
    )
    correlations = [
        f"- {name}: {entry['rho']:+.3f} (p {format_number(entry['p_value'])})"
        for name, entry in analysis["correlations"].items()
    ]
    return (
        "\n".join(
            [
                "# Learned per-sample temperatures",
                "",
                f"Checkpoint `{checkpoint}` (table `{tau_key}`), images `{images}`: "
                f"{analysis['samples']} samples.",
                "",
                frame.to_markdown(index=False, disable_numparse=True),
                "",
                "Spearman correlation over samples of the temperature against (permutation p):",
                "",
                *correlations,
                "",
                "Local density is the mean cosine similarity of an image to its k nearest images; "
                "iSogCLR is meant to give images with many similar images (frequent semantics) "
                "larger temperatures, so a positive correlation is what the method intends.",
                "",
                "![histogram](temperature_histogram.png)",
                "",
                "![density](temperature_vs_density.png)",
                "",
                "![extremes](temperature_extremes.png)",
                "",
                extremes_table.astype(str).to_markdown(index=False, disable_numparse=True),
            ]
        )
        + "\n"
    )


def plot_histogram(
    path: Path, tau: np.ndarray, labels: Sequence[int], classes: Sequence[str]
) -> None:
    """The temperatures, one histogram per class folder (unit area each when there are several)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels_a = np.asarray(labels)
    groups = {
        f"{name} ({(labels_a == c).sum()})": tau[labels_a == c] for c, name in enumerate(classes)
    }
    plot_distribution_by_group(ax, groups, count=61, density=len(classes) > 1, histtype="step")
    ax.set_xlabel("learned temperature")
    ax.set_ylabel("density" if len(classes) > 1 else "images")
    if len(classes) <= 12:
        ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_densities(
    path: Path, tau: np.ndarray, densities: Mapping[str, np.ndarray], groups: Sequence[str], k: int
) -> None:
    """Temperature against each local density, side by side, points coloured by class."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(densities), figsize=(5.5 * len(densities), 4), squeeze=False)
    for ax, (name, values) in zip(axes[0], densities.items()):
        plot_temperature_vs_density(ax, values, tau, groups=groups)
        ax.set_xlabel(f"{name} (mean cosine of {k} nearest)")
    save_figure(fig, path)


# --------------------------------------------------------------------------- command line
