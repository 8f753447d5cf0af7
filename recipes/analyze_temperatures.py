"""What did iSogCLR learn on your data? ``python -m recipes.analyze_temperatures --help``.

Takes a Lightly-side checkpoint (the loss's state, and optionally the backbone) and the image
folder the model was trained on, and writes into ``--output``:

- ``temperature_histogram.png``: the per-sample temperatures, one histogram per class folder;
- ``temperature_extremes.png`` and ``extremes.csv``: the images with the highest and lowest
  temperatures;
- ``temperature_vs_density.png``: temperature against label-free local density (the mean cosine
  similarity of each image to its k nearest images) in the backbone's feature space and in pixel
  space, with Spearman correlations over samples and permutation p-values;
- ``per_sample.csv``: index, file, class, temperature and both densities per image;
- ``summary.md``: quantiles, the correlations (also against the size of each image's class
  folder where there are several), the extremes.

Index ``i`` of the temperature table is image ``i`` of the folder in the order of
``torchvision.datasets.ImageFolder`` (class folders sorted, files sorted within each), which is
the index ``lightly_tau.IndexedDataset(ImageFolder(...))`` gives during training; a folder with
no class sub-folders is read as one class, files sorted by name. A count that differs from the
table's size is an error.

Checkpoints: a ``dict`` holding the loss's ``state_dict`` under ``loss`` or ``criterion`` (or at
the top level, as a Lightning checkpoint's ``state_dict`` does), whose per-sample temperatures
are the 1-D tensor under a key ``tau`` or ending in ``.tau`` (``--tau-key`` picks one if there are
several). The backbone, optional: the long-tail recipe's own checkpoints (``model`` and
``settings``) are rebuilt; otherwise ``--backbone PATH`` (a TorchScript file or a whole module
saved with ``torch.save``) or a module stored under ``backbone`` in the checkpoint. Without a
backbone only the pixel-space density is computed.

Example, from a training script (``criterion = ISogCLRLoss(...)``, ``backbone = ...``)::

    torch.save({"loss": criterion.state_dict(), "backbone": backbone}, "run.pt")
    # python -m recipes.analyze_temperatures --checkpoint run.pt --images data/train \\
    #     --image-size 32 --output tau_report
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F

from recipes.temperature_analysis import (
    extremes,
    knn_density,
    plot_distribution_by_group,
    plot_temperature_vs_density,
    pyplot,
    quantiles,
    spearman,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class AnalysisError(ValueError):
    """A checkpoint or folder that cannot be analysed; the message says which and why."""


# --------------------------------------------------------------------------- inputs
def find_temperatures(checkpoint: Any, key: Optional[str] = None) -> tuple[str, Tensor]:
    """The per-sample temperature table in ``checkpoint`` and its key.

    Looks in ``checkpoint["loss"]``, ``checkpoint["criterion"]``, ``checkpoint["state_dict"]``
    and the top level for 1-D tensors under ``tau`` or a key ending in ``.tau``; ``key`` picks
    one by its full key. Raises :class:`AnalysisError` when there is none, or several and no
    ``key``.
    """
    if not isinstance(checkpoint, Mapping):
        raise AnalysisError(f"--checkpoint must hold a dict, got {type(checkpoint).__name__}")
    found: dict[str, Tensor] = {}
    for prefix in ("loss", "criterion", "state_dict", None):
        table = checkpoint.get(prefix) if prefix else checkpoint
        if not isinstance(table, Mapping):
            continue
        for name, value in table.items():
            full = f"{prefix}/{name}" if prefix else str(name)
            if (
                isinstance(value, Tensor)
                and value.dim() == 1
                and (name == "tau" or str(name).endswith(".tau"))
            ):
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
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files: list[Path] = []
    labels: list[int] = []
    if classes:
        for c, name in enumerate(classes):
            mine = sorted(
                p
                for p in (folder / name).rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            files += mine
            labels += [c] * len(mine)
    else:
        files = sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        classes = [folder.name]
        labels = [0] * len(files)
    if not files:
        raise AnalysisError(f"--images {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files, classes, labels


def load_images(files: Sequence[Path], size: int, channels: int) -> Tensor:
    """uint8 tensor (N, channels, size, size): each image resized (bilinear) to size x size."""
    mode = "L" if channels == 1 else "RGB"
    out = torch.empty(len(files), channels, size, size, dtype=torch.uint8)
    for i, path in enumerate(files):
        with Image.open(path) as image:
            pixels = np.array(image.convert(mode).resize((size, size), Image.BILINEAR))
        out[i] = torch.from_numpy(pixels.reshape(size, size, channels)).permute(2, 0, 1)
    return out


def _first_conv_channels(state_dict: Mapping[str, Tensor]) -> int:
    for value in state_dict.values():
        if isinstance(value, Tensor) and value.dim() == 4:
            return int(value.shape[1])
    raise AnalysisError("the checkpoint's model has no convolution to read its input channels from")


def load_backbone(
    checkpoint: Mapping[str, Any], path: Optional[Path], image_size: Optional[int]
) -> tuple[Optional[nn.Module], Optional[int], Optional[int]]:
    """The feature extractor, its input channels and image size where the checkpoint says them.

    Order: ``path`` (TorchScript, else a whole pickled module), the long-tail recipe's ``model``
    with ``settings``, a module under ``backbone``; None when there is none.
    """
    if path is not None:
        try:
            module: nn.Module = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError):
            module = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(module, nn.Module):
            raise AnalysisError(f"--backbone {path} is not a module ({type(module).__name__})")
        return module.eval(), None, image_size
    settings = checkpoint.get("settings")
    if isinstance(checkpoint.get("model"), Mapping) and isinstance(settings, Mapping):
        from recipes.longtail.models import SimCLRModel

        channels = _first_conv_channels(checkpoint["model"])
        size = image_size or 224
        model = SimCLRModel(
            settings["backbone"], channels, size, settings["hidden_dim"], settings["output_dim"]
        )
        model.load_state_dict(checkpoint["model"])
        return _Features(model).eval(), channels, size
    if isinstance(checkpoint.get("backbone"), nn.Module):
        return checkpoint["backbone"].eval(), None, image_size
    return None, None, image_size


class _Features(nn.Module):
    """The long-tail recipe's backbone features (not the projection head's output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.features(x)  # type: ignore[operator]


@torch.no_grad()
def backbone_features(
    backbone: nn.Module, images: Tensor, mean: Sequence[float], std: Sequence[float], batch: int
) -> np.ndarray:
    """Flattened, L2-normalised features of images scaled to [0, 1] and standardised."""
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    chunks = []
    for start in range(0, len(images), batch):
        x = (images[start : start + batch].float() / 255.0 - mean_t) / std_t
        chunks.append(F.normalize(torch.flatten(backbone(x), 1).float(), dim=1))
    return torch.cat(chunks).numpy()


def pixel_features(images: Tensor, max_side: int = 32) -> np.ndarray:
    """Flattened, centred, L2-normalised pixels, downsampled to at most ``max_side`` px (as the
    long-tail recipe's raw-pixel reference)."""
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
    out: dict[str, Any] = {
        "samples": int(len(tau)),
        "quantiles": quantiles(tau),
        "per_class": [
            {"class": name, "images": int(sizes[c]), **quantiles(tau[labels_a == c])}
            for c, name in enumerate(classes)
        ],
        "correlations": {},
    }
    predictors = dict(densities)
    if len(classes) > 1:
        predictors["class size"] = sizes[labels_a].astype(np.float64)
    for name, values in predictors.items():
        rho, p = spearman(values, tau, permutations=permutations)
        out["correlations"][name] = {"rho": rho, "p_value": p}
    return out


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or np.isnan(value) else f"{value:.{digits}f}"


def summary_markdown(
    checkpoint: Path, tau_key: str, images: Path, analysis: Mapping[str, Any], table: pd.DataFrame
) -> str:
    q = analysis["quantiles"]
    lines = [
        "# Learned per-sample temperatures",
        "",
        f"Checkpoint `{checkpoint}` (table `{tau_key}`), images `{images}`: "
        f"{analysis['samples']} samples.",
        "",
        "| | images | mean | min | p10 | p50 | p90 | max |",
        "|---|---|---|---|---|---|---|---|",
        f"| all | {analysis['samples']} | "
        + " | ".join(_fmt(q[k]) for k in ("mean", "min", "p10", "p50", "p90", "max"))
        + " |",
    ]
    for c in analysis["per_class"]:
        lines.append(
            f"| {c['class']} | {c['images']} | "
            + " | ".join(
                _fmt(c.get(k, np.nan)) for k in ("mean", "min", "p10", "p50", "p90", "max")
            )
            + " |"
        )
    lines += [
        "",
        "Spearman correlation over samples of the temperature against (permutation p):",
        "",
    ]
    for name, entry in analysis["correlations"].items():
        lines.append(f"- {name}: {entry['rho']:+.3f} (p {_fmt(entry['p_value'])})")
    lines += [
        "",
        "Local density is the mean cosine similarity of an image to its k nearest images; iSogCLR "
        "is meant to give images with many similar images (frequent semantics) larger "
        "temperatures, so a positive correlation is what the method intends.",
        "",
        "![histogram](temperature_histogram.png)",
        "",
        "![density](temperature_vs_density.png)",
        "",
        "![extremes](temperature_extremes.png)",
        "",
        "| end | rank | index | file | class | tau |",
        "|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['end']} | {r['rank']} | {r['index']} | {r['file']} | {r['class']} | "
            f"{r['tau']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot_extremes(path: Path, table: pd.DataFrame, images: Tensor) -> None:
    plt = pyplot()
    k = int(table["rank"].max())
    fig, axes = plt.subplots(2, k, figsize=(1.6 * k + 0.6, 4.2), squeeze=False)
    for row, end in enumerate(("highest", "lowest")):
        part = table[table["end"] == end].reset_index(drop=True)
        for col in range(k):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(part):
                ax.axis("off")
                continue
            image = images[int(part.loc[col, "index"])].permute(1, 2, 0).numpy()
            ax.imshow(image[:, :, 0] if image.shape[2] == 1 else image, cmap="gray")
            ax.set_title(f"{part.loc[col, 'class']}\ntau {part.loc[col, 'tau']:.3f}", fontsize=7)
            if col == 0:
                ax.set_ylabel(f"{end} tau", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recipes.analyze_temperatures",
        description="Histogram, extremes and local-density analysis of the per-sample "
        "temperatures in a checkpoint, on the images they were learned from.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument(
        "--images", type=Path, required=True, help="the training images (ImageFolder layout)"
    )
    parser.add_argument("--output", type=Path, default=Path("tau_analysis"))
    parser.add_argument("--tau-key", default=None, help="which temperature table, if several")
    parser.add_argument(
        "--backbone", type=Path, default=None, help="TorchScript or torch.save'd module"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="images are resized to this square size (default: the first image's width)",
    )
    parser.add_argument(
        "--channels", type=int, choices=(1, 3), default=None, help="default: the model's, or 3"
    )
    parser.add_argument(
        "--mean",
        type=float,
        nargs="+",
        default=None,
        help="per-channel normalisation (default: the images' own)",
    )
    parser.add_argument("--std", type=float, nargs="+", default=None)
    parser.add_argument("--k", type=int, default=20, help="neighbours of the local density")
    parser.add_argument("--extremes", type=int, default=8, help="images shown at each end")
    parser.add_argument("--batch-size", type=int, default=256)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the analysis; returns the exit status (bad inputs exit with status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")
    if args.extremes < 1:
        parser.error(f"--extremes must be >= 1, got {args.extremes}")
    try:
        checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        tau_key, tau_t = find_temperatures(checkpoint, args.tau_key)
        files, classes, labels = list_images(args.images)
        if len(files) != len(tau_t):
            raise AnalysisError(
                f"--images {args.images} holds {len(files)} images but the temperature table "
                f"{tau_key!r} has {len(tau_t)} entries: the folder must be the training set, in "
                "ImageFolder order"
            )
        if not 1 <= args.k <= len(files) - 1:
            raise AnalysisError(f"--k must be in [1, {len(files) - 1}], got {args.k}")
        if args.image_size is None:  # the first image's width
            with Image.open(files[0]) as first:
                args.image_size = first.size[0]
        backbone, channels, size = load_backbone(checkpoint, args.backbone, args.image_size)
        channels = args.channels or channels or 3
        images = load_images(files, size, channels)
    except (AnalysisError, OSError) as err:
        parser.error(str(err))
    tau = tau_t.double().numpy()
    args.output.mkdir(parents=True, exist_ok=True)
    scaled = images.float() / 255.0
    mean = args.mean or scaled.mean(dim=(0, 2, 3)).tolist()
    std = args.std or scaled.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
    if len(mean) != channels or len(std) != channels:
        parser.error(f"--mean and --std need {channels} values each")
    densities = {"local density, pixels": knn_density(pixel_features(images), args.k)}
    if backbone is not None:
        features = backbone_features(backbone, images, mean, std, args.batch_size)
        densities = {"local density, features": knn_density(features, args.k), **densities}
    analysis = analyse(tau, labels, classes, densities)

    relative = [str(p.relative_to(args.images)) for p in files]
    frame = pd.DataFrame(
        {
            "index": range(len(files)),
            "file": relative,
            "class": [classes[c] for c in labels],
            "tau": tau,
        }
    )
    for name, values in densities.items():
        frame[name.replace("local density, ", "density_")] = values
    frame.to_csv(args.output / "per_sample.csv", index=False, quoting=csv.QUOTE_MINIMAL)
    table = extremes(frame[["index", "file", "class", "tau"]], "tau", args.extremes)
    table.to_csv(args.output / "extremes.csv", index=False)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    groups = {
        f"{name} ({(np.asarray(labels) == c).sum()})": tau[np.asarray(labels) == c]
        for c, name in enumerate(classes)
    }
    plot_distribution_by_group(ax, groups, count=61, density=len(classes) > 1, histtype="step")
    ax.set_xlabel("learned temperature")
    ax.set_ylabel("density" if len(classes) > 1 else "images")
    if len(classes) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.output / "temperature_histogram.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(densities), figsize=(5.5 * len(densities), 4), squeeze=False)
    for ax, (name, values) in zip(axes[0], densities.items()):
        plot_temperature_vs_density(ax, values, tau, groups=[classes[c] for c in labels])
        ax.set_xlabel(f"{name} (mean cosine of {args.k} nearest)")
    fig.tight_layout()
    fig.savefig(args.output / "temperature_vs_density.png", dpi=110)
    plt.close(fig)
    plot_extremes(args.output / "temperature_extremes.png", table, images)
    (args.output / "summary.md").write_text(
        summary_markdown(args.checkpoint, tau_key, args.images, analysis, table)
    )
    for name, entry in analysis["correlations"].items():
        print(f"Spearman(tau, {name}) = {entry['rho']:+.3f} (p {_fmt(entry['p_value'])})")
    print(f"Report: {args.output / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
