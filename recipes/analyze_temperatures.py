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

import sys
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from recipes.cli_args import RawDescription, function_arguments, function_parser


class AnalysisError(ValueError):
    """A checkpoint or folder that cannot be analysed; the message says which and why."""


def analyze_temperatures(
    checkpoint: Path,
    images: Path,
    output: Path = Path("tau_analysis"),
    tau_key: Optional[str] = None,
    backbone: Optional[Path] = None,
    image_size: Optional[int] = None,
    channels: Optional[Literal[1, 3]] = None,
    mean: Optional[list[float]] = None,
    std: Optional[list[float]] = None,
    k: int = 20,
    extremes: int = 8,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Histogram, extremes and local-density analysis of the per-sample temperatures in a
    checkpoint, on the images they were learned from.

    Args:
        checkpoint: the checkpoint holding the loss's state (and optionally the backbone)
        images: the training images (ImageFolder layout)
        output: folder for the plots and tables
        tau_key: which temperature table, if several
        backbone: TorchScript or torch.save'd module
        image_size: images are resized to this square size (default: the first image's width)
        channels: default: the model's, or 3
        mean: per-channel normalisation (default: the images' own)
        std: per-channel normalisation (default: the images' own)
        k: neighbours of the local density
        extremes: images shown at each end
        batch_size: images per forward pass of the backbone

    Raises:
        AnalysisError: An input that does not fit (the message names it), before anything is
            written.
    """
    # numpy, pandas, scipy and torch load here, so that --help answers without them
    import pandas as pd
    import torch

    from recipes import temperature_report as report
    from recipes.temperature_analysis import extremes as extremes_table
    from recipes.temperature_analysis import knn_density, plot_extremes_grid

    if k < 1 or extremes < 1:
        raise AnalysisError(f"--k and --extremes must be >= 1, got {k} and {extremes}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    key, tau_t = report.find_temperatures(state, tau_key)
    files, classes, labels = report.list_images(images)
    if len(files) != len(tau_t):
        raise AnalysisError(
            f"--images {images} holds {len(files)} images but the temperature table "
            f"{key!r} has {len(tau_t)} entries: the folder must be the training set, in "
            "ImageFolder order"
        )
    if not 1 <= k <= len(files) - 1:
        raise AnalysisError(f"--k must be in [1, {len(files) - 1}], got {k}")
    if image_size is None:  # the first image's width
        from PIL import Image

        with Image.open(files[0]) as first:
            image_size = first.size[0]
    model, model_channels, size = report.load_backbone(state, backbone, image_size)
    channels = channels or model_channels or 3
    pixels = report.load_images(files, size, channels)
    scaled = pixels.float() / 255.0
    mean = mean or scaled.mean(dim=(0, 2, 3)).tolist()
    std = std or scaled.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
    if len(mean) != channels or len(std) != channels:
        raise AnalysisError(f"--mean and --std need {channels} values each")
    tau = tau_t.double().numpy()
    densities = {"local density, pixels": knn_density(report.pixel_features(pixels), k)}
    if model is not None:
        features = report.backbone_features(model, pixels, mean, std, batch_size)
        densities = {"local density, features": knn_density(features, k), **densities}
    analysis = report.analyse(tau, labels, classes, densities)
    names = [classes[c] for c in labels]
    frame = pd.DataFrame(
        {
            "index": range(len(files)),
            "file": [str(p.relative_to(images)) for p in files],
            "class": names,
            "tau": tau,
        }
    )
    for name, values in densities.items():
        frame[name.replace("local density, ", "density_")] = values
    output.mkdir(parents=True, exist_ok=True)
    frame.to_csv(output / "per_sample.csv", index=False)
    table = extremes_table(frame[["index", "file", "class", "tau"]], "tau", extremes)
    table.to_csv(output / "extremes.csv", index=False)
    report.plot_histogram(output / "temperature_histogram.png", tau, labels, classes)
    report.plot_densities(output / "temperature_vs_density.png", tau, densities, names, k)
    plot_extremes_grid(output / "temperature_extremes.png", table, pixels)
    (output / "summary.md").write_text(
        report.summary_markdown(checkpoint, key, images, analysis, table)
    )
    return analysis


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the analysis; returns the exit status (bad inputs exit with status 2)."""
    parser = function_parser(
        analyze_temperatures,
        prog="python -m recipes.analyze_temperatures",
        formatter_class=RawDescription,
    )
    _, options = function_arguments(parser, analyze_temperatures, argv)
    try:
        analysis = analyze_temperatures(**options)
    except (AnalysisError, OSError) as err:
        parser.error(str(err))
    from recipes.temperature_report import format_number

    for name, entry in analysis["correlations"].items():
        print(f"Spearman(tau, {name}) = {entry['rho']:+.3f} (p {format_number(entry['p_value'])})")
    print(f"Report: {Path(options['output']) / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
