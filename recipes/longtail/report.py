"""The report folder: results tables (CSV, JSON), PNG plots and a Markdown page.

Every number written here comes from the runs' :class:`RunResult` objects; nothing is typed in.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from recipes.longtail.claim import (  # noqa: E402
    ClaimRun,
    claim_rows,
    claim_section,
    claim_verdict,
    class_table,
    density_analysis,
    density_verdict,
    plot_claim_curves,
    plot_density,
    write_per_sample_csv,
)
from recipes.longtail.data import GROUP_NAMES, LongTailData  # noqa: E402
from recipes.longtail.train import (  # noqa: E402
    LOSS_LABELS,
    LOSS_REGISTRY,
    LossSettings,
    RunResult,
)
from recipes.temperature_analysis import (  # noqa: E402
    extremes,
    plot_distribution_by_group,
    quantiles,
)

ACCURACY_KINDS = ("knn", "probe")
GROUPS = ("all",) + GROUP_NAMES
PLOTS = {
    "accuracy": "accuracy_by_group.png",
    "curves": "training_curves.png",
    "tau_class": "temperature_by_class.png",
    "tau_hist": "temperature_histogram.png",
    "tau_extremes": "temperature_extremes.png",
    "claim": "claim_spearman.png",
    "density": "temperature_vs_density.png",
}
# Training images shown and listed at each end of the learned temperatures.
EXTREMES_K = 8
GROUP_COLORS = ("tab:blue", "tab:orange", "tab:red")
SIGNIFICANCE = 0.05


# --------------------------------------------------------------------------- rows and tables
def run_row(result: RunResult) -> dict[str, Any]:
    """One flat row of measurements per run (the CSV table)."""
    row: dict[str, Any] = {"loss": result.loss, "label": LOSS_LABELS[result.loss]}
    row["seed"] = result.seed
    row["epochs"] = len(result.history)
    for kind in ACCURACY_KINDS:
        for group in GROUPS:
            row[f"{kind}_{group}"] = result.evaluation[kind][group]
    last = result.history[-1] if result.history else {}
    row["final_loss"] = last.get("loss_mean", math.nan)
    low, high = result.temperature_bounds
    row["tau_bound_low"], row["tau_bound_high"] = low, high
    if result.temperatures is not None:
        row["tau_mean"] = result.temperatures["mean"]
        row["tau_min"] = result.temperatures["min"]
        row["tau_max"] = result.temperatures["max"]
        for group in GROUP_NAMES:
            row[f"tau_{group}"] = result.temperatures["per_group"][group]
        row["spearman_final"] = result.temperatures["spearman"]
        row["p_value_final"] = result.temperatures["p_value"]
        best = max(
            (h for h in result.history if not math.isnan(h.get("spearman", math.nan))),
            key=lambda h: h["spearman"],
            default=None,
        )
        row["spearman_max"] = best["spearman"] if best else math.nan
        row["spearman_max_epoch"] = best["epoch"] if best else math.nan
    else:
        row["tau_mean"] = last.get("tau_mean", math.nan)
        row["tau_min"] = min((h["tau_low"] for h in result.history), default=math.nan)
        row["tau_max"] = max((h["tau_high"] for h in result.history), default=math.nan)
        for group in GROUP_NAMES:
            row[f"tau_{group}"] = math.nan
        for name in ("spearman_final", "p_value_final", "spearman_max", "spearman_max_epoch"):
            row[name] = math.nan
    row["train_seconds"] = result.train_seconds
    row["eval_seconds"] = result.eval_seconds
    return row


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std


SUMMARY_FIELDS = [f"{k}_{g}" for k in ACCURACY_KINDS for g in GROUPS] + [
    "tau_mean",
    "tau_min",
    "tau_max",
    "spearman_final",
    "p_value_final",
    "spearman_max",
    "train_seconds",
]


def summary_rows(rows: list[dict[str, Any]], losses: Sequence[str]) -> list[dict[str, Any]]:
    """One row per loss: mean and sample standard deviation over seeds of each measurement."""
    summary = []
    for loss in losses:
        mine = [r for r in rows if r["loss"] == loss]
        if not mine:
            continue
        row: dict[str, Any] = {"loss": loss, "label": LOSS_LABELS[loss], "seeds": len(mine)}
        row["seed_list"] = " ".join(str(r["seed"]) for r in mine)
        for name in SUMMARY_FIELDS:
            mean, std = _mean_std([float(r[name]) for r in mine])
            row[f"{name}_mean"], row[f"{name}_std"] = mean, std
        row["tau_min"] = min(r["tau_min"] for r in mine)
        row["tau_max"] = max(r["tau_max"] for r in mine)
        summary.append(row)
    return summary


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _json_ready(value: Any) -> Any:
    """NaN and infinities as None, so the JSON file is standard JSON."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


# --------------------------------------------------------------------------- plots
def _colors(losses: Sequence[str]) -> dict[str, Any]:
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def temperature_extremes(
    tau: Sequence[float], data: LongTailData, k: int = EXTREMES_K
) -> pd.DataFrame:
    """The ``k`` training images with the highest and the ``k`` with the lowest temperature.

    ``tau`` holds one temperature per image of ``data.train``, in its order. Rows: highest
    (largest first), then lowest (smallest first); columns ``end``, ``rank``, ``index`` (into
    ``data.train``), ``class``, ``class_name``, ``class_count`` (training images of the class),
    ``group`` and ``tau``.
    """
    targets = data.train.targets.tolist()
    if len(tau) != len(targets):
        raise ValueError(
            f"{len(tau)} temperatures for {len(targets)} training images: they must be the "
            "run's per-sample temperatures in training-set order."
        )
    frame = pd.DataFrame(
        {
            "index": range(len(targets)),
            "class": targets,
            "class_name": [data.classes[c] for c in targets],
            "class_count": [data.class_counts[c] for c in targets],
            "group": [data.class_group[c] for c in targets],
            "tau": [float(t) for t in tau],
        }
    )
    return extremes(frame, "tau", k)


def plot_temperature_extremes(
    path: Path, table: pd.DataFrame, data: LongTailData, seed: int
) -> None:
    """A grid of the images in ``table`` (from :func:`temperature_extremes`): the highest
    temperatures on the top row, the lowest on the bottom, each titled with class and tau."""
    ends = [
        ("highest", table[table["end"] == "highest"]),
        ("lowest", table[table["end"] == "lowest"]),
    ]
    cols = max(1, *(len(part) for _, part in ends))
    fig, axes = plt.subplots(2, cols, figsize=(1.6 * cols + 0.6, 4.2), squeeze=False)
    for row, (end, part) in enumerate(ends):
        for col in range(cols):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(part):
                ax.axis("off")
                continue
            entry = part.iloc[col]
            image = data.train.images[int(entry["index"])].permute(1, 2, 0).numpy()
            if image.shape[2] == 1:
                ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(image)
            ax.set_title(f"{entry['class_name']}\ntau {entry['tau']:.3f}", fontsize=7)
            if col == 0:
                ax.set_ylabel(f"{end} tau", fontsize=8)
    fig.suptitle(
        f"iSogCLR: training images with the highest and lowest learned temperature (seed {seed})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_temperature_extremes(
    path: Path, tau: Sequence[float], data: LongTailData, seed: int, k: int = EXTREMES_K
) -> pd.DataFrame:
    """Writes the image grid of :func:`plot_temperature_extremes` to ``path``; returns the table."""
    table = temperature_extremes(tau, data, k)
    plot_temperature_extremes(path, table, data, seed)
    return table


def temperature_quantiles_by_group(
    results: Sequence[RunResult], data: LongTailData
) -> list[dict[str, Any]]:
    """Per run and class group: samples and quantiles of the per-sample temperatures."""
    targets = data.train.targets.tolist()
    rows = []
    for result in results:
        tau = result.sample_temperatures or []
        for group in GROUP_NAMES:
            values = [t for t, c in zip(tau, targets) if data.class_group[c] == group]
            rows.append(
                {"seed": result.seed, "group": group, "samples": len(values), **quantiles(values)}
            )
    return rows


# --------------------------------------------------------------------------- markdown
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pm(row: dict[str, Any], name: str, digits: int = 3) -> str:
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    if math.isnan(std):
        return _fmt(mean, digits)
    return f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def temperature_sample_sections(
    plots: dict[str, str],
    tau_extremes: Optional[pd.DataFrame],
    tau_quantiles: Optional[list[dict[str, Any]]],
    seed: int,
) -> list[str]:
    """Report lines: per-group temperature quantiles, and the images at either end of tau."""
    lines: list[str] = []
    if tau_quantiles:
        lines += [
            "Per-sample temperatures by class group after the last epoch (quantiles over the "
            "group's training images):",
            "",
        ]
        header = ["seed", "group", "images", "mean", "min", "p10", "p50", "p90", "max"]
        cells = [
            [str(q["seed"]), q["group"], str(q["samples"])]
            + [_fmt(q.get(name)) for name in ("mean", "min", "p10", "p50", "p90", "max")]
            for q in tau_quantiles
        ]
        lines += [_table(header, cells), ""]
    if tau_extremes is not None and len(tau_extremes):
        k = int(tau_extremes["rank"].max())
        lines += [
            f"Training images with the {k} highest and the {k} lowest learned temperatures "
            f"(seed {seed}); `index` is the image's position in the long-tailed training set:",
            "",
            f"![training images at either end of the temperatures]({plots['tau_extremes']})",
            "",
        ]
        header = ["end", "rank", "index", "class", "class size", "group", "tau"]
        cells = [
            [
                str(r["end"]),
                str(r["rank"]),
                str(r["index"]),
                str(r["class_name"]),
                str(r["class_count"]),
                str(r["group"]),
                _fmt(float(r["tau"]), 4),
            ]
            for _, r in tau_extremes.iterrows()
        ]
        lines += [_table(header, cells), ""]
    return lines


def findings(
    summary: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    baseline: Optional[dict],
    claim_tested: bool = False,
) -> list[str]:
    """Plain statements of what this run's numbers can and cannot support.

    With ``claim_tested`` the iSogCLR correlation of the comparison's own runs is left to the
    claim's verdict over seeds and class orders, which includes them.
    """
    notes = []
    seeds = sorted({r["seed"] for r in rows})
    for kind, title in (("knn", "kNN"), ("probe", "Linear-probe")):
        means = [(r[f"{kind}_all_mean"], r["label"]) for r in summary]
        if len(means) > 1:
            best, worst = max(means), min(means)
            gap = best[0] - worst[0]
            stds = [r[f"{kind}_all_std"] for r in summary if not math.isnan(r[f"{kind}_all_std"])]
            if stds:
                spread = statistics.fmean(stds)
                verdict = "more than" if gap > 2 * spread else "at most"
                notes.append(
                    f"{title} accuracy over all classes: the losses span {100 * gap:.1f} points "
                    f"({worst[1]} {100 * worst[0]:.1f}% to {best[1]} {100 * best[0]:.1f}%); the "
                    f"seed-to-seed standard deviation over {len(seeds)} seeds averages "
                    f"{100 * spread:.1f} points, and the span is {verdict} twice that (a rough "
                    "screen, not a significance test)."
                )
            else:
                notes.append(
                    f"{title} accuracy over all classes: the losses span {100 * gap:.1f} points "
                    f"({worst[1]} {100 * worst[0]:.1f}% to {best[1]} {100 * best[0]:.1f}%) with "
                    "one seed, so the seed-to-seed spread is unknown and no ranking of the losses "
                    "follows from this run; use `--seeds 0 1 2`."
                )
    if baseline and summary:
        for kind, name in (("knn", "kNN"), ("probe", "linear-probe")):
            best = max(r[f"{kind}_all_mean"] for r in summary)
            worst = min(r[f"{kind}_all_mean"] for r in summary)
            raw = baseline[kind]["all"]
            if best < raw:
                verdict = (
                    f"every loss's {name} accuracy (at most {100 * best:.1f}%) is below the same "
                    f"evaluation on raw pixels ({100 * raw:.1f}%): by this measure the "
                    "representations are not yet better than the pixels."
                )
            elif worst > raw:
                verdict = (
                    f"every loss's {name} accuracy (at least {100 * worst:.1f}%) is above the same "
                    f"evaluation on raw pixels ({100 * raw:.1f}%)."
                )
            else:
                verdict = (
                    f"{name} accuracies ({100 * worst:.1f}% to {100 * best:.1f}%) straddle the same "
                    f"evaluation on raw pixels ({100 * raw:.1f}%)."
                )
            notes.append(verdict[0].upper() + verdict[1:])
    iso = next((r for r in summary if r["loss"] == "isogclr"), None)
    if iso is not None and not claim_tested:
        iso_rows = [r for r in rows if r["loss"] == "isogclr"]
        parts = []
        for r in iso_rows:
            if math.isnan(r["spearman_final"]):
                parts.append(f"seed {r['seed']}: undefined (every class has the same frequency)")
                continue
            sig = "significant" if r["p_value_final"] < SIGNIFICANCE else "not significant"
            parts.append(
                f"seed {r['seed']}: {r['spearman_final']:+.2f} (permutation p {r['p_value_final']:.3f}, "
                f"{sig} at {SIGNIFICANCE}; highest over epochs {r['spearman_max']:+.2f} at epoch "
                f"{int(r['spearman_max_epoch'])})"
            )
        notes.append(
            "iSogCLR's learned temperature against class frequency (Spearman over classes, after "
            "the last epoch): " + "; ".join(parts) + ". A positive value is the paper's claim: "
            "frequent classes get larger temperatures, rare ones smaller."
        )
        notes.append(
            f"Class mean temperatures by group (last epoch, mean over seeds): head "
            f"{_fmt(_mean_std([r['tau_head'] for r in iso_rows])[0])}, middle "
            f"{_fmt(_mean_std([r['tau_middle'] for r in iso_rows])[0])}, tail "
            f"{_fmt(_mean_std([r['tau_tail'] for r in iso_rows])[0])}; compare with the spread "
            "within a class (p10-p90 bars in the temperature plot)."
        )
    return notes


def markdown(
    config: dict,
    data: LongTailData,
    rows: list[dict[str, Any]],
    summary: list[dict[str, Any]],
    baseline: Optional[dict],
    results: list[RunResult],
    plots: dict[str, str],
    timing: dict,
    tau_extremes: Optional[pd.DataFrame] = None,
    tau_quantiles: Optional[list[dict[str, Any]]] = None,
    claim_lines: Sequence[str] = (),
    claim_findings: Sequence[str] = (),
) -> str:
    """The report page.

    ``tau_extremes`` (:func:`temperature_extremes` of the first iSogCLR run) and
    ``tau_quantiles`` (:func:`temperature_quantiles_by_group`) add their tables to the
    temperature section when given; ``claim_lines`` (:func:`claim_section`) is the section on
    the temperature-frequency claim over seeds and class orders, and ``claim_findings`` its
    verdicts, listed first among the findings.
    """
    t, ls = config["train"], config["loss"]
    losses = [r["label"] for r in summary]
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        f"# Long-tailed SimCLR on {data.name}: {', '.join(losses)}",
        "",
        f"Command: `{config['command']}`  ",
        f"Finished {timing['finished']}, {timing['total_seconds'] / 60:.1f} minutes in all, on "
        f"{config['environment']['device']}: {config['environment']['parallel_runs']} run(s) "
        f"side by side with {config['environment']['threads']} thread(s) each (torch "
        f"{config['environment']['torch']}, lightly {config['environment']['lightly']}).  ",
        f"Seeds: {' '.join(map(str, seeds))} (model initialisation, batch order and "
        f"augmentation); the long-tailed subset is fixed by data seed {data.data_seed}.",
        "",
        "## What this run can and cannot show",
        "",
    ]
    lines += [f"- **{note}**" for note in claim_findings]
    lines += [f"- {note}" for note in findings(summary, rows, baseline, bool(claim_findings))]
    lines += [
        f"- Budget: {t['epochs']} epochs of batch {t['batch_size']} on {len(data.train)} images. "
        "Published long-tail "
        "gains of these losses are 1 to 2 points after hundreds of epochs with a ResNet-18; a "
        "run of minutes on a small backbone tests the pipeline and the temperature dynamics, "
        "not those gains.",
        "- Tail accuracy mixes rarity with how hard a class is (which classes are rare depends "
        f"on the class order, here `{data.class_order}`); `--class-order permuted` with other "
        "data seeds separates the two.",
        "- kNN uses the long-tailed training set as its bank, which favours head classes; the "
        "linear probe is trained on a class-balanced labelled subset and reads the features "
        "more evenly.",
        "",
        "## Results",
        "",
        "Top-1 accuracy on the balanced test set (mean ± standard deviation over seeds where "
        "there are several), and temperatures after the last epoch. `tau` is the mean temperature "
        "applied to negatives' logits over the last epoch (the effective one where the loss "
        "changes it: the cosine schedule's, MACL's model-aware one, DySTreSS's negative pairs'); "
        "for iSogCLR the mean of its learned per-sample temperatures, with the class "
        "correlation.",
        "",
    ]
    header = [
        "loss",
        "temperature",
        "kNN all",
        "kNN head",
        "kNN mid",
        "kNN tail",
        "probe all",
        "probe head",
        "probe mid",
        "probe tail",
        "tau",
        "Spearman",
        "p",
    ]
    table = []
    for r in summary:
        table.append(
            [r["label"], LOSS_REGISTRY[r["loss"]].temperature_kind]
            + [_pm(r, f"{k}_{g}") for k in ACCURACY_KINDS for g in GROUPS]
            + [_pm(r, "tau_mean"), _pm(r, "spearman_final", 2), _pm(r, "p_value_final")]
        )
    if baseline:
        table.append(
            ["raw pixels (reference)", "–"]
            + [_fmt(baseline[k][g]) for k in ACCURACY_KINDS for g in GROUPS]
            + ["–", "–", "–"]
        )
    lines += [_table(header, table), ""]
    if len(seeds) > 1:
        lines += ["Per run:", ""]
        run_header = [
            "loss",
            "seed",
            "kNN all",
            "kNN tail",
            "probe all",
            "probe tail",
            "tau",
            "Spearman",
            "train s",
        ]
        lines += [
            _table(
                run_header,
                [
                    [
                        r["label"],
                        str(r["seed"]),
                        _fmt(r["knn_all"]),
                        _fmt(r["knn_tail"]),
                        _fmt(r["probe_all"]),
                        _fmt(r["probe_tail"]),
                        _fmt(r["tau_mean"]),
                        _fmt(r["spearman_final"], 2),
                        _fmt(r["train_seconds"], 0),
                    ]
                    for r in rows
                ],
            ),
            "",
        ]
    lines += [f"![accuracy per class group]({plots['accuracy']})", ""]

    iso = [r for r in results if r.loss == "isogclr" and r.temperatures]
    lines += ["## Temperature against class frequency", ""]
    if iso:
        lines += [
            "iSogCLR learns one temperature per training sample. Class mean temperature after "
            "the last epoch:",
            "",
        ]
        header = ["class", "images", "group"] + [f"tau, seed {r.seed}" for r in iso]
        by_class = []
        for c in sorted(range(data.num_classes), key=lambda c: data.class_rank[c]):
            by_class.append(
                [data.classes[c], str(data.class_counts[c]), data.class_group[c]]
                + [_fmt(r.temperatures["per_class"][c]["mean"]) for r in iso]
            )
        lines += [_table(header, by_class), ""]
        lines += [
            "Spearman correlation (class count, class mean temperature) after each epoch:",
            "",
        ]
        epochs = [h["epoch"] for h in iso[0].history]
        header = ["epoch"] + [f"seed {r.seed}: rho (p)" for r in iso]
        per_epoch = []
        for i, epoch in enumerate(epochs):
            cells = [str(epoch)]
            for r in iso:
                h = r.history[i] if i < len(r.history) else {}
                cells.append(f"{_fmt(h.get('spearman'), 2)} ({_fmt(h.get('p_value'), 3)})")
            per_epoch.append(cells)
        lines += [_table(header, per_epoch), ""]
        lines += [
            f"![temperature by class]({plots['tau_class']})",
            "",
            f"![temperature histogram]({plots['tau_hist']})",
            "",
        ]
        extremes_seed = next((r.seed for r in iso if r.sample_temperatures), iso[0].seed)
        lines += temperature_sample_sections(plots, tau_extremes, tau_quantiles, extremes_seed)
    else:
        lines += [
            "iSogCLR was not among the losses run, so there are no per-sample temperatures.",
            "",
        ]
    lines += list(claim_lines)
    lines += ["## Training curves", "", f"![training curves]({plots['curves']})", ""]

    lines += ["## Data", ""]
    lines += [
        f"{data.name} from `{data.source}`: long-tailed training split with imbalance "
        f"{data.imbalance:g} (CIFAR-10-LT profile: the class at frequency rank r keeps "
        f"int(n_max · {data.imbalance:g}^(-r/(C-1))) images), class order `{data.class_order}`, "
        f"{len(data.train)} training images; balanced test split of {len(data.test)} images; "
        f"linear probe trained on {len(data.probe)} labelled images (class-balanced, from the "
        "full training split). Groups are thirds of the frequency ranks.",
        "",
    ]
    test_counts = data.test.targets.bincount(minlength=data.num_classes).tolist()
    rows_data = [
        [
            str(data.class_rank[c]),
            data.classes[c],
            str(data.class_counts[c]),
            data.class_group[c],
            str(test_counts[c]),
        ]
        for c in sorted(range(data.num_classes), key=lambda c: data.class_rank[c])
    ]
    lines += [_table(["rank", "class", "train images", "group", "test images"], rows_data), ""]
    lines += [f"- {note}" for note in data.notes] + ([""] if data.notes else [])

    lines += ["## Settings", ""]
    settings_rows = [
        [
            "backbone",
            f"{t['backbone']} + Lightly SimCLRProjectionHead ({t['hidden_dim']}-{t['output_dim']})",
        ],
        [
            "optimiser",
            f"{t['optimizer']}, lr {t['lr']:g}, weight decay {t['weight_decay']:g}, "
            f"warmup {t['warmup_epochs']} epochs, cosine decay per step",
        ],
        ["epochs, batch size", f"{t['epochs']}, {t['batch_size']}"],
        [
            "precision",
            "bf16 autocast for the model, float32 for the losses"
            if t["precision"] == "bf16"
            else "float32",
        ],
        ["augmentation", f"{t['augment']}: {config['augment']}"],
    ]
    loss_settings = LossSettings(**ls)
    settings_rows += [
        [LOSS_LABELS[name], LOSS_REGISTRY[name].describe(loss_settings)]
        for name in config["losses"]
    ]
    settings_rows += [
        [
            "kNN",
            f"k {t['knn_k']}, weights exp(similarity / {t['knn_t']:g}), L2-normalised backbone features",
        ],
        ["linear probe", f"{t['probe_epochs']} epochs of Adam on frozen, standardised features"],
    ]
    lines += [_table(["setting", "value"], settings_rows), ""]
    if config.get("eta_note"):
        lines += [config["eta_note"], ""]
    lines += [
        "## Files",
        "",
        "- `results.csv`: one row per run (loss and seed); `summary.csv`: one row per loss, "
        "mean and standard deviation over seeds; `results.json`: everything, with the per-epoch "
        "history and per-class values.",
        "- `checkpoints/`: model and loss state (iSogCLR's per-sample temperatures) per run."
        if config.get("checkpoints")
        else "- No checkpoints were saved (`--no-checkpoints`).",
        "",
    ]
    return "\n".join(lines)


def write_report(
    output: Path,
    config: dict,
    data: LongTailData,
    results: list[RunResult],
    baseline: Optional[dict],
    timing: dict,
    claim_runs: Sequence[ClaimRun] = (),
) -> dict[str, Path]:
    """Writes every report file into ``output`` and returns their paths by kind.

    ``results`` are the comparison's runs (on ``data``); ``claim_runs`` the iSogCLR runs of the
    temperature-frequency claim over seeds and class orders (:mod:`recipes.longtail.claim`),
    which add ``claim.csv``, ``per_sample.csv``, two plots and a report section.
    """
    output.mkdir(parents=True, exist_ok=True)
    losses = [loss for loss in config["losses"] if any(r.loss == loss for r in results)]
    rows = [run_row(r) for r in results]
    summary = summary_rows(rows, losses)
    colors = _colors(config["losses"])
    paths = {
        "results_csv": output / "results.csv",
        "summary_csv": output / "summary.csv",
        "results_json": output / "results.json",
        "report": output / "report.md",
        "accuracy_plot": output / PLOTS["accuracy"],
        "curves_plot": output / PLOTS["curves"],
    }
    write_csv(paths["results_csv"], rows)
    write_csv(paths["summary_csv"], summary)
    plot_accuracy(paths["accuracy_plot"], summary, baseline, colors)
    plot_training_curves(paths["curves_plot"], results, losses, colors)
    iso = [r for r in results if r.loss == "isogclr" and r.temperatures]
    # Plots of an earlier run in the same folder must not pass for this run's.
    for name in (
        PLOTS["tau_class"],
        PLOTS["tau_hist"],
        PLOTS["tau_extremes"],
        PLOTS["claim"],
        PLOTS["density"],
        "claim.csv",
        "per_sample.csv",
    ):
        (output / name).unlink(missing_ok=True)
    claim_document: dict[str, Any] = {}
    claim_lines: list[str] = []
    claim_findings: list[str] = []
    if claim_runs:
        verdict = claim_verdict(claim_runs)
        analyses = [density_analysis(r) for r in claim_runs if r.tau is not None]
        table_rows = claim_rows(claim_runs, analyses)
        paths["claim_csv"] = output / "claim.csv"
        write_csv(paths["claim_csv"], table_rows)
        paths["claim_plot"] = output / PLOTS["claim"]
        plot_claim_curves(paths["claim_plot"], claim_runs)
        if analyses:
            paths["per_sample_csv"] = output / "per_sample.csv"
            write_per_sample_csv(paths["per_sample_csv"], claim_runs)
            paths["density_plot"] = output / PLOTS["density"]
            # One run per class order in the plot (the first seed of each).
            shown: dict = {}
            for run in claim_runs:
                shown.setdefault((run.class_order, run.data_seed), run)
            plot_density(paths["density_plot"], list(shown.values()))
        claim_lines = claim_section(claim_runs, verdict, analyses, PLOTS, class_table(claim_runs))
        claim_findings = [verdict["text"]] + ([density_verdict(analyses)] if analyses else [])
        claim_document = {"verdict": verdict, "runs": table_rows, "density": analyses}
    tau_extremes: Optional[pd.DataFrame] = None
    tau_quantiles: list[dict[str, Any]] = []
    if iso:
        paths["temperature_class_plot"] = output / PLOTS["tau_class"]
        paths["temperature_histogram_plot"] = output / PLOTS["tau_hist"]
        plot_temperature_by_class(paths["temperature_class_plot"], iso, data)
        plot_temperature_histogram(paths["temperature_histogram_plot"], iso[0], data)
        with_samples = [r for r in iso if r.sample_temperatures]
        tau_quantiles = temperature_quantiles_by_group(with_samples, data)
        if with_samples:
            paths["temperature_extremes_plot"] = output / PLOTS["tau_extremes"]
            tau_extremes = write_temperature_extremes(
                paths["temperature_extremes_plot"],
                with_samples[0].sample_temperatures,
                data,
                with_samples[0].seed,
            )
    document = {
        "config": config,
        "data": data.summary(),
        "baseline_raw_pixels": baseline,
        "runs": [
            {
                k: v
                for k, v in r.to_dict().items()
                if k not in ("sample_temperatures", "sample_density")
            }
            for r in results
        ],
        "rows": rows,
        "summary": summary,
        "temperature_quantiles_by_group": tau_quantiles,
        "temperature_extremes": (
            tau_extremes.to_dict(orient="records") if tau_extremes is not None else []
        ),
        "claim": claim_document,
        "timing": timing,
    }
    with open(paths["results_json"], "w") as handle:
        json.dump(_json_ready(document), handle, indent=1)
    page = markdown(
        config,
        data,
        rows,
        summary,
        baseline,
        results,
        PLOTS,
        timing,
        tau_extremes,
        tau_quantiles,
        claim_lines,
        claim_findings,
    )
    paths["report"].write_text(page)
    return paths


def summary_table(summary: list[dict[str, Any]], baseline: Optional[dict]) -> str:
    """A fixed-width table of the main numbers, for the terminal."""
    header = f"{'loss':<30}{'kNN':>7}{'kNN tail':>10}{'probe':>8}{'probe tail':>12}{'tau':>8}{'Spearman':>10}"
    lines = [header, "-" * len(header)]

    def pct(value: float) -> str:
        return "–" if math.isnan(value) else f"{100 * value:.1f}"

    for r in summary:
        rho = r["spearman_final_mean"]
        lines.append(
            f"{r['label']:<30}{pct(r['knn_all_mean']):>7}{pct(r['knn_tail_mean']):>10}"
            f"{pct(r['probe_all_mean']):>8}{pct(r['probe_tail_mean']):>12}"
            f"{_fmt(r['tau_mean_mean']):>8}{('–' if math.isnan(rho) else f'{rho:+.2f}'):>10}"
        )
    if baseline:
        lines.append(
            f"{'raw pixels (reference)':<30}{pct(baseline['knn']['all']):>7}"
            f"{pct(baseline['knn']['tail']):>10}{pct(baseline['probe']['all']):>8}"
            f"{pct(baseline['probe']['tail']):>12}{'–':>8}{'–':>10}"
        )
    return "\n".join(lines)
