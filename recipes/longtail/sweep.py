"""SogCLR's claim, tested: does a small batch hurt? ``python -m recipes.longtail.sweep --help``.

SogCLR (Yuan et al., ICML 2022, "Provable stochastic optimization for global contrastive
learning: small batch does not harm performance") says NT-Xent degrades as the batch shrinks
because its mini-batch estimate of the contrastive normaliser is biased, while SogCLR's
per-sample moving average removes that bias. This sweep trains the long-tail recipe's SimCLR model
at several batch sizes at equal epochs (so smaller batches take more steps, as in the paper) for
NT-Xent, SogCLR and iSogCLR on Fashion-MNIST, long-tailed (imbalance 100) and balanced (the same
number of images, spread evenly over the classes), for several seeds, and writes:

- ``sweep.csv``: one row per profile, loss, batch size and seed (accuracies, times);
- ``sweep_summary.csv``: mean and standard deviation over seeds;
- ``sweep.png``: linear-probe (solid) and kNN (dashed) accuracy against batch size;
- ``sweep.md``: the tables, the change from the largest to the smallest batch per loss, and a
  one-line reading of that change against the seed-to-seed spread.

Everything else (model, optimiser, augmentation, loss settings, evaluation) is the main job's
default (``python -m recipes.longtail``). ``--smoke`` runs the same code on a few images for a
couple of steps (a test of the pipeline; the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

from recipes.cli_args import ArgumentParser, PositiveInt, add_dataclass
from recipes.longtail.cli import DEFAULT_EPOCHS, loss_names

if TYPE_CHECKING:
    from recipes.longtail.train import RunResult

PROFILES = ("long-tailed", "balanced")
DEFAULT_BATCH_SIZES = (32, 64, 128, 256)
DEFAULT_SWEEP_LOSSES = ("ntxent", "sogclr", "isogclr")
SMOKE = {
    "max_per_class": 48,
    "imbalance": 6.0,
    "test_per_class": 12,
    "probe_per_class": 10,
    "epochs": 1,
    "steps_per_epoch": 2,
    "batch_sizes": [8, 16],
    "seeds": [0],
    "probe_epochs": 5,
    "knn_k": 5,
}


@dataclass
class SweepOptions:
    """sweep

    Args:
        imbalance: of the long-tailed profile
        parallel_runs: runs side by side, one thread each (default: one per core)
        smoke: a few images, 1 epoch of 2 steps, batch sizes 8 and 16, one seed
    """

    batch_sizes: list[PositiveInt] = field(default_factory=lambda: list(DEFAULT_BATCH_SIZES))
    losses: list[Literal[loss_names()]] = field(  # type: ignore[misc]
        default_factory=lambda: list(DEFAULT_SWEEP_LOSSES)
    )
    profiles: list[Literal[PROFILES]] = field(default_factory=lambda: list(PROFILES))  # type: ignore[misc]
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    epochs: PositiveInt = DEFAULT_EPOCHS
    imbalance: float = 100.0
    max_per_class: Optional[PositiveInt] = None
    test_per_class: Optional[PositiveInt] = None
    probe_per_class: PositiveInt = 500
    probe_epochs: PositiveInt = 100
    knn_k: PositiveInt = 20
    steps_per_epoch: Optional[PositiveInt] = None
    data_root: Path = Path("data")
    output: Path = Path("runs") / "batch_sweep"
    parallel_runs: Optional[PositiveInt] = None
    threads: Optional[PositiveInt] = None
    no_progress: bool = False
    smoke: bool = False


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m recipes.longtail.sweep",
        description="Linear-probe and kNN accuracy against batch size at equal epochs for "
        "NT-Xent, SogCLR and iSogCLR on Fashion-MNIST, long-tailed and balanced (SogCLR's "
        "small-batch claim).",
        allow_abbrev=False,
    )
    add_dataclass(parser, SweepOptions)
    return parser


def parse_options(argv: Sequence[str]) -> tuple[ArgumentParser, Any]:
    """Parses the command line; ``--smoke`` values become defaults that explicit options beat."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    return parser, args


# --------------------------------------------------------------------------- tables
def sweep_row(profile: str, result: RunResult) -> dict[str, Any]:
    """One flat row per run."""
    from recipes.longtail.losses import LOSS_LABELS

    return {
        "profile": profile,
        "loss": result.loss,
        "label": LOSS_LABELS[result.loss],
        "batch_size": result.batch_size,
        "seed": result.seed,
        "steps": sum(h.get("steps", 0) for h in result.history),
        "knn_all": result.evaluation["knn"]["all"],
        "knn_tail": result.evaluation["knn"]["tail"],
        "probe_all": result.evaluation["probe"]["all"],
        "probe_tail": result.evaluation["probe"]["tail"],
        "train_seconds": result.train_seconds,
        "train_cpu_seconds": result.train_cpu_seconds,
    }


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds per (profile, loss, batch size), in the
    order the groups first appear (pandas ``groupby().agg``; one seed gives a NaN std)."""
    import pandas as pd

    from recipes.longtail.losses import LOSS_LABELS

    keys = ["profile", "loss", "batch_size"]
    metrics = ["knn_all", "knn_tail", "probe_all", "probe_tail", "train_seconds"]
    frame = pd.DataFrame(list(rows), columns=[*keys, "seed", *metrics])
    frame[metrics] = frame[metrics].astype(float)
    grouped = frame.groupby(keys, sort=False)
    table = grouped[metrics].agg(["mean", "std"])
    table.columns = [f"{name}_{stat}" for name, stat in table.columns]
    table.insert(0, "seeds", grouped.size())
    table = table.reset_index()
    table.insert(2, "label", table["loss"].map(LOSS_LABELS))
    return [
        {k: v.item() if hasattr(v, "item") else v for k, v in record.items()}
        for record in table.to_dict("records")
    ]


def batch_effect(
    summary: Sequence[dict[str, Any]], metric: str = "probe_all"
) -> list[dict[str, Any]]:
    """Per profile and loss: accuracy at the smallest minus at the largest batch size (points),
    with the mean seed-to-seed standard deviation of that profile and loss for scale."""
    from recipes.longtail.losses import LOSS_LABELS

    out = []
    for profile, loss in dict.fromkeys((r["profile"], r["loss"]) for r in summary):
        mine = sorted(
            (r for r in summary if (r["profile"], r["loss"]) == (profile, loss)),
            key=lambda r: r["batch_size"],
        )
        if len(mine) < 2:
            continue
        small, large = mine[0], mine[-1]
        stds = [r[f"{metric}_std"] for r in mine if not math.isnan(r[f"{metric}_std"])]
        out.append(
            {
                "profile": profile,
                "loss": loss,
                "label": LOSS_LABELS[loss],
                "small_batch": small["batch_size"],
                "large_batch": large["batch_size"],
                "change": small[f"{metric}_mean"] - large[f"{metric}_mean"],
                "seed_std": statistics.fmean(stds) if stds else math.nan,
            }
        )
    return out


def effect_sentence(effect: dict[str, Any]) -> str:
    """How the change from the largest to the smallest batch compares with seed noise."""
    change, std = 100 * effect["change"], 100 * effect["seed_std"]
    text = (
        f"{effect['label']} ({effect['profile']}): {change:+.1f} points from batch "
        f"{effect['large_batch']} to {effect['small_batch']}"
    )
    if math.isnan(std):
        return text + " (one seed: no spread to compare with)"
    if abs(change) <= 2 * std:
        return text + f", within twice the seed-to-seed standard deviation ({std:.1f})"
    return text + f", more than twice the seed-to-seed standard deviation ({std:.1f})"


def plot_sweep(path: Path, summary: Sequence[dict[str, Any]], profiles: Sequence[str]) -> None:
    """Accuracy against batch size (log-2 axis), one panel per profile, one colour per loss:
    linear probe solid, kNN dashed, error bars the standard deviation over seeds."""
    from recipes.longtail.losses import LOSS_LABELS
    from recipes.temperature_analysis import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(profiles), figsize=(6 * len(profiles), 4.2), squeeze=False)
    cmap = plt.get_cmap("tab10")
    losses = list(dict.fromkeys(r["loss"] for r in summary))
    for ax, profile in zip(axes[0], profiles):
        for i, loss in enumerate(losses):
            mine = sorted(
                (r for r in summary if r["profile"] == profile and r["loss"] == loss),
                key=lambda r: r["batch_size"],
            )
            if not mine:
                continue
            batches = [r["batch_size"] for r in mine]
            for metric, style, label in (
                ("probe_all", "-o", f"{LOSS_LABELS[loss]} probe"),
                ("knn_all", "--s", f"{LOSS_LABELS[loss]} kNN"),
            ):
                errors = [r[f"{metric}_std"] for r in mine]
                ax.errorbar(
                    batches,
                    [100 * r[f"{metric}_mean"] for r in mine],
                    yerr=None
                    if all(math.isnan(e) for e in errors)
                    else [100 * (0 if math.isnan(e) else e) for e in errors],
                    fmt=style,
                    color=cmap(i),
                    capsize=3,
                    label=label,
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["batch_size"] for r in summary}))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("batch size (equal epochs)")
        ax.set_ylabel("top-1 on the balanced test set (%)")
        ax.set_title(f"Fashion-MNIST, {profile}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pm(row: dict[str, Any], name: str) -> str:
    mean, std = 100 * row[f"{name}_mean"], 100 * row[f"{name}_std"]
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def _metric_table(
    summary: list[dict], losses: list[str], batches: list[int], profile: str, metric: str
) -> list[str]:
    """Markdown rows of ``metric`` (mean ± sd over seeds) per loss and batch size, one profile."""
    from recipes.longtail.losses import LOSS_LABELS

    cells = {
        (r["loss"], r["batch_size"]): _pm(r, metric) for r in summary if r["profile"] == profile
    }
    lines = ["| loss | " + " | ".join(f"batch {b}" for b in batches) + " |"]
    lines += ["|---|" + "---|" * len(batches)]
    for loss in losses:
        row = " | ".join(cells.get((loss, b), "–") for b in batches)
        lines.append(f"| {LOSS_LABELS[loss]} | {row} |")
    return lines + [""]


def markdown(
    config: dict[str, Any],
    summary: Sequence[dict[str, Any]],
    effects: Sequence[dict[str, Any]],
    minutes: float,
) -> str:
    """The sweep's report page."""
    lines = [
        "# Batch-size sweep: does a small batch hurt? (SogCLR's claim)",
        "",
        f"Command: `{config['command']}`  ",
        f"{minutes:.1f} minutes on {config['environment']}. Seeds {config['seeds']}; "
        f"{config['epochs']} epochs at every batch size (smaller batches take more steps); "
        "the main job's model, optimiser (Adam 1e-3, cosine decay), augmentation and loss "
        "settings.",
        "",
        "Linear-probe top-1 on the balanced test set (%), mean ± standard deviation over seeds:",
        "",
    ]
    batches = sorted({r["batch_size"] for r in summary})
    for profile in config["profiles"]:
        lines += [f"**{profile}** ({config['train_images'][profile]} training images)", ""]
        lines += _metric_table(summary, config["losses"], batches, profile, "probe_all")
    lines += ["kNN top-1 (%), same runs:", ""]
    for profile in config["profiles"]:
        lines += [f"**{profile}**", ""]
        lines += _metric_table(summary, config["losses"], batches, profile, "knn_all")
    lines += ["Linear-probe change from the largest to the smallest batch:", ""]
    lines += [f"- {effect_sentence(e)}." for e in effects]
    lines += ["", "![accuracy against batch size](sweep.png)", ""]
    return "\n".join(lines)


def _sweep_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The Fashion-MNIST training sets of the profiles: long-tailed, and balanced with as many
    images, spread evenly over the classes."""
    from recipes.longtail.data import DatasetUnavailable, load_long_tail_data

    try:
        datas = {
            "long-tailed": load_long_tail_data(
                "fashion-mnist",
                args.data_root,
                imbalance=args.imbalance,
                max_per_class=args.max_per_class,
                test_per_class=args.test_per_class,
                probe_per_class=args.probe_per_class,
            )
        }
        if "balanced" in args.profiles:
            # As many images as the long-tailed set, spread evenly over the classes.
            per_class = len(datas["long-tailed"].train) // datas["long-tailed"].num_classes
            datas["balanced"] = load_long_tail_data(
                "fashion-mnist",
                args.data_root,
                imbalance=1.0,
                max_per_class=per_class,
                test_per_class=args.test_per_class,
                probe_per_class=args.probe_per_class,
            )
    except (DatasetUnavailable, ValueError) as err:
        parser.error(f"Fashion-MNIST: {err}")
    for profile in args.profiles:
        if max(args.batch_sizes) > len(datas[profile].train):
            parser.error(
                f"--batch-sizes: {max(args.batch_sizes)} is larger than the "
                f"{len(datas[profile].train)} {profile} training images."
            )
    return datas


def _sweep_jobs(args: argparse.Namespace) -> list[Any]:
    """One run per profile, seed, batch size and loss."""
    from recipes.longtail.run import Job

    return [
        Job(
            loss=loss,
            seed=seed,
            label=f"{profile} {loss} batch {batch} seed {seed}",
            checkpoint=None,
            data_key=profile,
            batch_size=batch,
        )
        for profile in args.profiles
        for seed in args.seeds
        for batch in args.batch_sizes
        for loss in args.losses
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the sweep; returns the exit status (argument errors exit with status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, args = parse_options(argv)
    started = time.time()
    # The heavy imports come after parsing, so --help and bad options answer at once.
    import torch

    from recipes.longtail.augment import AugmentSettings
    from recipes.longtail.report import write_csv
    from recipes.longtail.run import (
        RunContext,
        available_cores,
        resolve_precision,
        run_parallel,
        run_sequential,
    )
    from recipes.longtail.train import LossSettings, TrainSettings

    if args.imbalance < 1:
        parser.error(f"--imbalance must be >= 1, got {args.imbalance:g}.")
    if any(b < 2 for b in args.batch_sizes):
        parser.error(f"--batch-sizes must all be >= 2, got {args.batch_sizes}.")
    args.output.mkdir(parents=True, exist_ok=True)
    datas = _sweep_data(parser, args)
    cores = available_cores()
    jobs = _sweep_jobs(args)
    parallel = max(1, min(args.parallel_runs or cores, len(jobs)))
    threads = args.threads or max(1, cores // parallel)
    torch.set_num_threads(threads)
    settings = TrainSettings(
        epochs=args.epochs,
        batch_size=max(args.batch_sizes),
        precision=resolve_precision("auto", "cpu"),
        knn_k=args.knn_k,
        probe_epochs=args.probe_epochs,
        steps_per_epoch=args.steps_per_epoch,
        progress=not args.no_progress,
    )
    loss_settings = LossSettings(cosine_period_epochs=args.epochs / 5)
    augment = AugmentSettings.for_dataset("fashion-mnist", 28, 1)
    context = RunContext(
        {p: datas[p] for p in args.profiles}, settings, loss_settings, augment, threads
    )
    print(
        f"Batch sweep: {len(jobs)} runs ({', '.join(args.profiles)} x seeds {args.seeds} x "
        f"batch {args.batch_sizes} x {', '.join(args.losses)}), {args.epochs} epochs each, "
        f"{parallel} at a time. Report: {args.output}",
        flush=True,
    )
    if parallel > 1:
        results, _ = run_parallel(jobs, context, parallel)
    else:
        results = run_sequential(jobs, context)
    rows = [sweep_row(job.data_key, r) for job, r in zip(jobs, results)]
    summary = summarize(rows)
    effects = batch_effect(summary)
    minutes = (time.time() - started) / 60
    config = {
        "command": "python -m recipes.longtail.sweep " + " ".join(argv),
        "environment": f"CPU ({cores} cores), {parallel} run(s) at a time, {threads} thread(s) each",
        "seeds": " ".join(map(str, args.seeds)),
        "epochs": args.epochs,
        "profiles": list(args.profiles),
        "losses": list(args.losses),
        "train_images": {p: len(datas[p].train) for p in args.profiles},
        "train": asdict(settings),
    }
    write_csv(args.output / "sweep.csv", rows)
    write_csv(args.output / "sweep_summary.csv", summary)
    plot_sweep(args.output / "sweep.png", summary, args.profiles)
    (args.output / "sweep.md").write_text(markdown(config, summary, effects, minutes))
    print()
    for effect in effects:
        print(effect_sentence(effect))
    print(f"{minutes:.1f} minutes. Report: {args.output / 'sweep.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
