"""The long-tail comparison's plots: accuracy by class group, training curves, and the iSogCLR
temperatures by class and as a histogram (``matplotlib``, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from recipes.longtail.data import GROUP_NAMES, LongTailData  # noqa: E402
from recipes.longtail.train import LOSS_LABELS, RunResult  # noqa: E402
from recipes.temperature_analysis import plot_distribution_by_group, save_figure  # noqa: E402

ACCURACY_KINDS = ("knn", "probe")
GROUPS = ("all",) + GROUP_NAMES
GROUP_COLORS = ("tab:blue", "tab:orange", "tab:red")


def loss_colors(losses: Sequence[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {loss: cmap(i) for i, loss in enumerate(losses)}


def plot_accuracy(
    path: Path, summary: list[dict[str, Any]], baseline: Optional[dict], colors: dict
) -> None:
    """Grouped bars: accuracy per class group and loss, kNN and linear probe side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    n = len(summary) + (1 if baseline else 0)
    width = 0.8 / max(n, 1)
    lowest = 1.0
    for ax, kind in zip(axes, ACCURACY_KINDS):
        for i, row in enumerate(summary):
            means = [row[f"{kind}_{g}_mean"] for g in GROUPS]
            stds = [row[f"{kind}_{g}_std"] for g in GROUPS]
            errors = None if all(math.isnan(s) for s in stds) else stds
            x = [g + (i - (n - 1) / 2) * width for g in range(len(GROUPS))]
            ax.bar(
                x,
                means,
                width,
                yerr=errors,
                capsize=2,
                label=row["label"],
                color=colors[row["loss"]],
            )
            lowest = min(lowest, *[m for m in means if not math.isnan(m)])
        if baseline:
            means = [baseline[kind][g] for g in GROUPS]
            x = [g + (n - 1 - (n - 1) / 2) * width for g in range(len(GROUPS))]
            ax.bar(x, means, width, label="raw pixels (reference)", color="0.7", hatch="//")
            lowest = min(lowest, *means)
        ax.set_xticks(range(len(GROUPS)), ["all classes", "head", "middle", "tail"])
        ax.set_title("kNN top-1" if kind == "knn" else "linear probe top-1")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy on the balanced test set")
    axes[0].set_ylim(max(0.0, lowest - 0.1), 1.0)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Accuracy per class group (error bars: standard deviation over seeds)")
    save_figure(fig, path)


def plot_training_curves(
    path: Path, results: list[RunResult], losses: Sequence[str], colors: dict
) -> None:
    """Loss per epoch (one panel per loss, own units), mean temperature, iSogCLR correlation."""
    panels = len(losses) + 2
    cols = min(4, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    flat = axes.flatten()
    for ax, loss in zip(flat, losses):
        for result in (r for r in results if r.loss == loss):
            epochs = [h["epoch"] for h in result.history]
            ax.plot(
                epochs,
                [h["loss_mean"] for h in result.history],
                marker=".",
                color=colors[loss],
                alpha=0.8,
                label=f"seed {result.seed}",
            )
        ax.set_title(f"{LOSS_LABELS[loss]}: training loss", fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = flat[len(losses)]
    for loss in losses:
        for k, result in enumerate(r for r in results if r.loss == loss):
            epochs = [h["epoch"] for h in result.history]
            ax.plot(
                epochs,
                [h["tau_mean"] for h in result.history],
                marker=".",
                color=colors[loss],
                label=LOSS_LABELS[loss] if k == 0 else None,
            )
    ax.set_yscale("log")
    ax.set_title("mean temperature of the negatives' logits", fontsize=9)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = flat[len(losses) + 1]
    isogclr = [r for r in results if r.loss == "isogclr"]
    for result in isogclr:
        epochs = [h["epoch"] for h in result.history]
        ax.plot(
            epochs, [h["spearman"] for h in result.history], marker="o", label=f"seed {result.seed}"
        )
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_title("iSogCLR: Spearman(class frequency, class mean tau)", fontsize=9)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    if isogclr:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "iSogCLR not run", ha="center", transform=ax.transAxes)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.suptitle("Training curves (each loss in its own units)")
    save_figure(fig, path)


def plot_temperature_by_class(path: Path, results: list[RunResult], data: LongTailData) -> None:
    """iSogCLR: class mean temperature against class frequency (final and over epochs)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    ax = axes[0]
    for result in results:
        per_class = sorted(result.temperatures["per_class"], key=lambda c: c["count"])
        counts = [c["count"] for c in per_class]
        means = [c["mean"] for c in per_class]
        (line,) = ax.plot(
            counts,
            means,
            marker="o",
            alpha=0.85,
            label=f"seed {result.seed}: Spearman {result.temperatures['spearman']:+.2f} "
            f"(p {result.temperatures['p_value']:.3f})",
        )
        # The p10-p90 band drawn as it is, not as errors around the mean: the mean falls
        # outside it when most of a class still sits at one value (e.g. tau_init after a few
        # steps) and a few samples have moved far.
        ax.vlines(
            counts,
            [c["p10"] for c in per_class],
            [c["p90"] for c in per_class],
            color=line.get_color(),
            alpha=0.6,
        )
    for c in results[0].temperatures["per_class"]:
        ax.annotate(
            c["name"],
            (c["count"], c["mean"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("learned temperature (class mean, bars: p10-p90)")
    ax.set_title("iSogCLR after the last epoch", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    result = results[0]
    cmap = plt.get_cmap("viridis")
    order = sorted(range(data.num_classes), key=lambda c: data.class_rank[c])
    epochs = [h["epoch"] for h in result.history]
    for position, class_id in enumerate(order):
        values = [h["tau_class_mean"][class_id] for h in result.history]
        ax.plot(
            epochs,
            values,
            marker=".",
            color=cmap(position / max(1, data.num_classes - 1)),
            label=f"{data.classes[class_id]} ({data.class_counts[class_id]})",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("class mean temperature")
    ax.set_title(f"over training, seed {result.seed} (yellow = rarest)", fontsize=10)
    ax.grid(alpha=0.3)
    if data.num_classes <= 12:
        ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)


def plot_temperature_histogram(path: Path, result: RunResult, data: LongTailData) -> None:
    """iSogCLR: distribution of the per-sample temperatures, by class group.

    Bins span the range the temperatures occupy (not their bounds), log-spaced when that range
    is a decade or more; each group is normalised to unit area, so group sizes do not hide the
    shapes.
    """
    fig, ax = plt.subplots(figsize=(7, 4))
    tau = result.sample_temperatures or []
    targets = data.train.targets.tolist()
    groups = {}
    for group in GROUP_NAMES:
        values = [t for t, c in zip(tau, targets) if data.class_group[c] == group]
        groups[f"{group} classes ({len(values)} samples)"] = values
    plot_distribution_by_group(
        ax, groups, colors=GROUP_COLORS, count=61, density=True, histtype="step"
    )
    ax.set_xlabel("learned temperature")
    ax.set_ylabel("density")
    ax.set_title(f"iSogCLR per-sample temperatures after the last epoch (seed {result.seed})")
    if tau:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
