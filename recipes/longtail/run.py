"""Command line of the long-tailed comparison: ``python -m recipes.longtail --help``.

Trains the same SimCLR model on a long-tailed dataset once per loss and seed, evaluates each
run, and writes a report folder. Every option is checked before any training starts.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Hashable, Optional, Sequence

import torch

from recipes.longtail.augment import AugmentSettings
from recipes.longtail.claim import claim_run_from_result, claim_verdict
from recipes.longtail.cli import (  # noqa: F401  (re-exported)
    DEFAULT_EPOCHS,
    DEFAULT_OUTPUT,
    build_parser,
)
from recipes.longtail.data import (
    DATASETS,
    DatasetUnavailable,
    LongTailData,
    load_long_tail_data,
)
from recipes.longtail.evaluate import evaluate_features, raw_pixel_features
from recipes.longtail.presets import PRESETS, smoke_defaults
from recipes.longtail.report import run_row, summary_rows, summary_table, write_report
from recipes.longtail.train import (
    LOSS_LABELS,
    LOSS_REGISTRY,
    LOSSES,
    LossSettings,
    RunResult,
    TemperatureLoss,
    TrainSettings,
    train_and_evaluate,
)
from recipes.temperature_analysis import knn_density

PUBLISHED_ISOGCLR_ETA = 0.03


def _dataset_choice(
    parser: argparse.ArgumentParser, tokens: Sequence[str]
) -> tuple[str, Optional[Path]]:
    name = tokens[0]
    if name not in DATASETS:
        parser.error(f"--dataset: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    if name == "folder":
        if len(tokens) != 2:
            parser.error("--dataset folder needs exactly one PATH: --dataset folder PATH")
        return name, Path(tokens[1])
    if len(tokens) != 1:
        parser.error(f"--dataset {name} takes no path (got {' '.join(tokens[1:])}).")
    return name, None


def check_output(parser: argparse.ArgumentParser, output: Path) -> None:
    """The report folder must be creatable and writable; tested by writing a file."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        parser.error(f"--output {output} cannot be written: {err.strerror or err}.")


def resolve_device(parser: argparse.ArgumentParser, device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; use --device cpu or auto.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_precision(precision: str, device: str) -> str:
    """bf16 autocast where the hardware has bf16 units; emulated bf16 is slower than float32."""
    if precision != "auto":
        return precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "32"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return "bf16" if native else "32"


def check_losses(
    parser: argparse.ArgumentParser, losses: Sequence[str], settings: LossSettings
) -> None:
    """Builds each chosen loss once, so the losses' own argument checks run before training."""
    if settings.cosine_tau_min <= 0 or settings.cosine_tau_min > settings.cosine_tau_max:
        parser.error(
            "--cosine-tau-min and --cosine-tau-max must satisfy 0 < min <= max, got "
            f"{settings.cosine_tau_min:g} and {settings.cosine_tau_max:g}."
        )
    if settings.cosine_period_epochs <= 0:
        parser.error(f"--cosine-period must be > 0, got {settings.cosine_period_epochs:g}.")
    for loss in losses:
        try:
            TemperatureLoss(loss, settings, num_samples=2)
        except ValueError as err:
            parser.error(f"{LOSS_REGISTRY[loss].flags} ({LOSS_LABELS[loss]}): {err}")


def eta_note(eta: float, epochs: int) -> str:
    if eta == PUBLISHED_ISOGCLR_ETA:
        return (
            f"iSogCLR runs with the published temperature step eta {eta:g}. Over {epochs} "
            "epochs the temperatures may still be rising from tau_init, so the class "
            "correlation can be weak simply because it has not formed yet."
        )
    return (
        f"iSogCLR's temperature step is eta {eta:g}, not the published {PUBLISHED_ISOGCLR_ETA:g} "
        "of the 400-epoch CIFAR recipe. In a 15-epoch Fashion-MNIST-LT run with this recipe's "
        "other defaults, eta 0.03 left the mean temperature still rising (0.13 to 0.34) after "
        "the last epoch, so a short run would test temperatures that have barely moved from "
        "tau_init; with eta 0.2 they move within the first epochs. Whether they then follow "
        "class frequency is what the claim section measures, over seeds and class orders. "
        "Pass `--isogclr-eta 0.03` for the published value."
    )


def raw_pixel_baseline(data: LongTailData, settings: TrainSettings) -> dict:
    """kNN and linear probe on raw pixels: what a representation has to beat."""
    train = raw_pixel_features(data.train)
    probe = raw_pixel_features(data.probe)
    test = raw_pixel_features(data.test)
    result = evaluate_features(
        train, probe, test, data, settings.knn_k, settings.knn_t, settings.probe_epochs, 0
    )
    return {"knn": result["knn"], "probe": result["probe"]}


def available_cores() -> int:
    """Cores this process may use (its CPU affinity where the platform reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def resolve_parallelism(
    parser: argparse.ArgumentParser, args: argparse.Namespace, device: str, jobs: int
) -> tuple[int, int]:
    """Runs side by side and torch threads per run.

    On a CPU, every loss of a seed trains side by side in its own process (at least one per
    core), with ``cores // runs`` threads each (at least one). Measured on two shared cores:
    one thread per run was both the fastest and the most robust choice (with two threads per
    run an epoch took five times longer while another process was busy); five runs side by side
    keep both cores busy to the end, where two at a time leave one idle during the fifth run.
    """
    cores = available_cores()
    if device == "cuda" or args.devices > 1:
        if args.parallel_runs and args.parallel_runs > 1:
            parser.error("--parallel-runs > 1 is for CPU runs; GPU and DDP runs go one at a time.")
        return 1, args.threads or cores
    parallel = args.parallel_runs or max(cores, len(set(args.losses)))
    parallel = max(1, min(parallel, jobs))
    threads = args.threads or max(1, cores // parallel)
    return parallel, threads


DataKey = Hashable  # (class order, data seed), or any key of RunContext.datas


@dataclass
class Job:
    """One run to do: a loss, a seed, its progress label and checkpoint path, which of the
    context's datasets it trains on, and optionally its own batch size."""

    loss: str
    seed: int
    label: str
    checkpoint: Optional[str]
    data_key: DataKey = ("natural", 0)
    batch_size: Optional[int] = None
    comparison: bool = True


@dataclass
class RunContext:
    """What every run shares: the datasets (by key) and the settings."""

    datas: dict
    settings: TrainSettings
    loss_settings: LossSettings
    augment: AugmentSettings
    threads: int


def _run_job(job: Job, context: RunContext, position: int = 0) -> Optional[RunResult]:
    settings = replace(
        context.settings,
        progress_position=position,
        batch_size=job.batch_size or context.settings.batch_size,
    )
    return train_and_evaluate(
        job.loss,
        job.seed,
        context.datas[job.data_key],
        settings,
        context.loss_settings,
        context.augment,
        job.checkpoint,
        job.label,
    )


def _print_run(job: Job, result: RunResult) -> None:
    row = run_row(result)
    rho = row["spearman_final"]
    print(
        f"{job.label}: kNN {100 * row['knn_all']:.1f}% (tail {100 * row['knn_tail']:.1f}%), "
        f"probe {100 * row['probe_all']:.1f}% (tail {100 * row['probe_tail']:.1f}%), "
        f"tau {row['tau_mean']:.3f}"
        + ("" if math.isnan(rho) else f", Spearman {rho:+.2f}")
        + f"; {result.train_seconds:.0f} s training, {result.eval_seconds:.0f} s evaluation",
        flush=True,
    )


def run_sequential(jobs: list[Job], context: RunContext) -> list[RunResult]:
    """Runs one after another in this process (GPU, DDP, or a single core)."""
    results = []
    for job in jobs:
        result = _run_job(job, context)
        if result is None:  # another DDP rank: the main process writes the report
            continue
        _print_run(job, result)
        results.append(result)
    return results


_WORKER: dict = {}


def _init_worker(context: RunContext, positions: Any) -> None:
    torch.set_num_threads(context.threads)
    _WORKER["context"] = context
    _WORKER["position"] = positions.get()


def _worker_job(job: Job) -> Optional[RunResult]:
    return _run_job(job, _WORKER["context"], _WORKER["position"])


def run_parallel(
    jobs: list[Job],
    context: RunContext,
    parallel: int,
    while_waiting: Optional[Callable[[], Any]] = None,
) -> tuple[list[RunResult], Any]:
    """Runs ``parallel`` jobs at a time in worker processes; results in the order of ``jobs``.

    Every run seeds itself, so its result does not depend on which process runs it.
    ``while_waiting`` is called in this process once the runs have started; its return value
    is returned with the results.
    """
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    mp_context = multiprocessing.get_context(method)
    if method == "forkserver":
        # Workers fork from one process that has imported torch and Lightning once.
        mp_context.set_forkserver_preload(["recipes.longtail.train"])
    positions = mp_context.Queue()
    for position in range(parallel):
        positions.put(position)
    results: dict[int, RunResult] = {}
    with ProcessPoolExecutor(
        max_workers=parallel,
        mp_context=mp_context,
        initializer=_init_worker,
        initargs=(context, positions),
    ) as pool:
        futures = {pool.submit(_worker_job, job): k for k, job in enumerate(jobs)}
        try:
            waited = while_waiting() if while_waiting is not None else None
            for future in as_completed(futures):
                k = futures[future]
                result = future.result()
                if result is not None:
                    _print_run(jobs[k], result)
                    results[k] = result
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return [results[k] for k in sorted(results)], waited


def parse_options(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Parses the command line; ``--preset`` and ``--smoke`` values become the defaults.

    Two passes: the first finds the preset, the second parses again with the preset's (then
    the smoke mode's) values as defaults, so options given on the command line keep theirs.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset or args.smoke:
        defaults = dict(PRESETS[args.preset]) if args.preset else {}
        if args.smoke:
            defaults.update(smoke_defaults(args.preset, args.output))
        parser.set_defaults(**defaults)
        args = parser.parse_args(argv)
    return parser, args


@dataclass
class Plan:
    """What the checked options resolve to: the losses, the iSogCLR claim runs, the device."""

    dataset: str
    folder: Optional[Path]
    losses: list[str]
    claim_seeds: list[int]
    claim_orders: list[str]
    device: str
    main_key: tuple[str, int]
    claim_keys: list[tuple[str, int]]
    claim_jobs: list[tuple[tuple[str, int], int]]
    parallel: int
    threads: int
    loss_settings: LossSettings


def _plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Plan:
    """Checks the options against each other (each error names its option) and resolves them."""
    dataset, folder = _dataset_choice(parser, args.dataset)
    if args.preset == "imagenet100-lt" and dataset != "folder":
        parser.error(
            "--preset imagenet100-lt reads ImageNet-100 from disk: add --dataset folder PATH "
            "(PATH/train and PATH/val with one folder per class), or --smoke for a stand-in."
        )
    if args.imbalance < 1:
        parser.error(
            f"--imbalance must be >= 1 (largest / smallest class), got {args.imbalance:g}."
        )
    if args.batch_size < 2:
        parser.error(
            f"--batch-size must be >= 2 (a contrastive batch needs negatives), got {args.batch_size}."
        )
    if folder is not None and not folder.is_dir():
        parser.error(f"--dataset folder: {folder} is not a directory.")
    if args.image_size is not None and dataset != "folder":
        parser.error(f"--image-size applies to 'folder' datasets only; {dataset} keeps its size.")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {' '.join(map(str, args.seeds))}.")
    losses = list(LOSSES) if "all" in args.losses else list(dict.fromkeys(args.losses))
    claim_seeds = list(dict.fromkeys(args.claim_seeds)) if "isogclr" in losses else []
    claim_orders = list(dict.fromkeys(args.claim_orders)) if claim_seeds else []
    device = resolve_device(parser, args.device)
    if args.devices > 1 and device == "cuda" and args.devices > torch.cuda.device_count():
        parser.error(
            f"--devices {args.devices}: only {torch.cuda.device_count()} GPUs are visible."
        )
    main_key = (args.class_order, args.data_seed)
    claim_keys = [(order, args.data_seed) for order in claim_orders]
    claim_jobs = [
        (key, seed)
        for key in claim_keys
        for seed in claim_seeds
        if not (key == main_key and seed in args.seeds)
    ]
    parallel, threads = resolve_parallelism(
        parser, args, device, len(losses) * len(args.seeds) + len(claim_jobs)
    )
    loss_settings = _from_options(
        LossSettings,
        args,
        cosine_period_epochs=args.cosine_period if args.cosine_period else args.epochs / 5,
    )
    check_losses(parser, losses, loss_settings)
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr:g}.")
    if args.knn_t <= 0:
        parser.error(f"--knn-t must be > 0, got {args.knn_t:g}.")
    check_output(parser, args.output)
    return Plan(
        dataset, folder, losses, claim_seeds, claim_orders, device, main_key, claim_keys,
        claim_jobs, parallel, threads, loss_settings,
    )  # fmt: skip


def _load_datas(parser: argparse.ArgumentParser, args: argparse.Namespace, plan: Plan) -> dict:
    """The long-tailed data of every (class order, data seed) the runs need."""
    datas: dict = {}
    for class_order, data_seed in [plan.main_key] + [
        k for k in plan.claim_keys if k != plan.main_key
    ]:
        try:
            datas[(class_order, data_seed)] = load_long_tail_data(
                plan.dataset,
                args.data_root,
                folder=plan.folder,
                imbalance=args.imbalance,
                class_order=class_order,
                data_seed=data_seed,
                max_per_class=args.max_per_class,
                test_per_class=args.test_per_class,
                probe_per_class=args.probe_per_class,
                image_size=args.image_size,
                download=args.download,
                workers=args.workers,
                standin=args.smoke and plan.dataset in ("cifar10", "cifar100"),
            )
        except (DatasetUnavailable, ValueError) as err:
            parser.error(f"--dataset {' '.join(args.dataset)}: {err}")
    per_process = min(len(d.train) for d in datas.values()) // args.devices
    if args.batch_size > per_process:
        parser.error(
            f"--batch-size {args.batch_size} is larger than the {per_process} long-tailed training "
            "images per process; lower it or the imbalance."
        )
    return datas


def _run_config(
    argv: Sequence[str],
    args: argparse.Namespace,
    plan: Plan,
    settings: TrainSettings,
    augment: AugmentSettings,
) -> dict[str, Any]:
    """The settings the report shows (and ``config.json`` keeps)."""
    return {
        "command": "python -m recipes.longtail " + shlex.join(argv),
        "dataset": plan.dataset,
        "preset": args.preset or "",
        "smoke": args.smoke,
        "losses": plan.losses,
        "seeds": list(args.seeds),
        "claim_seeds": plan.claim_seeds,
        "claim_orders": plan.claim_orders,
        "train": asdict(settings),
        "loss": asdict(plan.loss_settings),
        "augment": ", ".join(f"{k} {v:g}" for k, v in asdict(augment).items()),
        "checkpoints": not args.no_checkpoints,
        "eta_note": eta_note(args.isogclr_eta, args.epochs) if "isogclr" in plan.losses else "",
        "environment": {
            "device": torch.cuda.get_device_name(0)
            if plan.device == "cuda"
            else f"CPU ({available_cores()} cores)",
            "threads": plan.threads,
            "parallel_runs": plan.parallel,
            "torch": torch.__version__,
            "lightly": _version("lightly"),
        },
    }


def _jobs(args: argparse.Namespace, plan: Plan) -> list[Job]:
    """Every training run: each loss for each seed, then the iSogCLR claim runs."""
    checkpoints = args.output / "checkpoints"
    total = len(plan.losses) * len(args.seeds) + len(plan.claim_jobs)

    def checkpoint(name: str) -> Optional[str]:
        return None if args.no_checkpoints else str(checkpoints / f"{name}.pt")

    jobs = [
        Job(
            loss=loss,
            seed=seed,
            label=f"[{k + 1}/{total}] {loss} seed {seed}",
            checkpoint=checkpoint(f"{loss}_seed{seed}"),
            data_key=plan.main_key,
        )
        for k, (seed, loss) in enumerate((s, name) for s in args.seeds for name in plan.losses)
    ]
    for k, (key, seed) in enumerate(plan.claim_jobs, start=len(jobs)):
        jobs.append(
            Job(
                loss="isogclr",
                seed=seed,
                label=f"[{k + 1}/{total}] isogclr {key[0]} order seed {seed}",
                checkpoint=checkpoint(f"isogclr_{key[0]}_data{key[1]}_seed{seed}"),
                data_key=key,
                comparison=False,
            )
        )
    return jobs


def _print_results(
    paths: dict[str, Path], summary: Any, baseline: Any, timing: dict, claim_runs: list
) -> None:
    print()
    print(summary_table(summary, baseline))
    print(
        f"\nAccuracy is top-1 on the balanced test set (%); Spearman: iSogCLR class mean "
        f"temperature against class frequency. {timing['total_seconds'] / 60:.1f} minutes in all."
    )
    if claim_runs:
        print(claim_verdict(claim_runs)["text"])
    print(
        f"Report: {paths['report']}  (tables: {paths['results_csv'].name}, "
        f"{paths['summary_csv'].name}, {paths['results_json'].name}; plots: *.png)"
    )


def main(argv: Optional[Sequence[str]] = None, started: Optional[float] = None) -> int:
    """Runs the comparison; returns the exit status (argument errors exit with status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, args = parse_options(argv)
    started = started or time.time()
    plan = _plan(parser, args)
    torch.set_num_threads(plan.threads)
    datas = _load_datas(parser, args, plan)
    data = datas[plan.main_key]
    settings = _from_options(
        TrainSettings,
        args,
        precision=resolve_precision(args.precision, plan.device),
        accelerator="gpu" if plan.device == "cuda" else "cpu",
        strategy="ddp" if args.devices > 1 else "auto",
        progress=not args.no_progress,
    )
    augment = AugmentSettings.for_dataset(plan.dataset, data.image_size, data.channels)
    config = _run_config(argv, args, plan, settings, augment)
    # Under DDP, Lightning re-runs this script once per extra process with these variables set.
    main_process = all(
        int(os.environ.get(v, "0")) == 0 for v in ("RANK", "LOCAL_RANK", "NODE_RANK")
    )
    if main_process:
        print(
            f"{plan.dataset}-LT: {len(data.train)} training images in {data.num_classes} classes "
            f"({max(data.class_counts)} to {min(data.class_counts)}), {len(data.test)} test images; "
            f"{len(plan.losses)} losses x {len(args.seeds)} seeds"
            + (f" + {len(plan.claim_jobs)} iSogCLR claim runs" if plan.claim_jobs else "")
            + f" x {args.epochs} epochs on {plan.device} "
            f"({settings.precision}; {plan.parallel} run(s) at a time, {plan.threads} thread(s) "
            f"each). Report: {args.output}",
            flush=True,
        )
    if not args.no_checkpoints and main_process:
        (args.output / "checkpoints").mkdir(parents=True, exist_ok=True)
    jobs = _jobs(args, plan)
    context = RunContext(datas, settings, plan.loss_settings, augment, plan.threads)
    density_keys = [plan.main_key] if "isogclr" in plan.losses else []
    density_keys += [k for k in plan.claim_keys if k not in density_keys]

    def while_training() -> tuple[dict, dict]:
        """The raw-pixel reference and the pixel-space densities (no training involved)."""
        pixel = {
            key: knn_density(
                raw_pixel_features(datas[key].train).numpy(),
                min(settings.density_k, len(datas[key].train) - 1),
            )
            for key in density_keys
        }
        return raw_pixel_baseline(data, settings), pixel

    if plan.parallel > 1:
        # Computed here while the workers train.
        all_results, (baseline, pixel_density) = run_parallel(
            jobs, context, plan.parallel, while_training
        )
    else:
        all_results = run_sequential(jobs, context)
        baseline, pixel_density = while_training() if main_process else (None, {})
    if not main_process:
        return 0
    results = [r for r, job in zip(all_results, jobs) if job.comparison]
    claim_runs = [
        claim_run_from_result(r, datas[(r.class_order, r.data_seed)], pixel_density)
        for key in plan.claim_keys
        for seed in plan.claim_seeds
        for r in all_results
        if r.loss == "isogclr" and (r.class_order, r.data_seed) == key and r.seed == seed
    ]
    timing = {
        "started": datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "finished": datetime.now().isoformat(timespec="seconds"),
        "total_seconds": time.time() - started,
    }
    paths = write_report(args.output, config, data, results, baseline, timing, claim_runs)
    summary = summary_rows([run_row(r) for r in results], plan.losses)
    _print_results(paths, summary, baseline, timing, claim_runs)
    return 0


def _from_options(settings: type, args: Any, **values: Any) -> Any:
    """Dataclass ``settings`` from the options named like its fields, and ``values``."""
    named = {f.name: getattr(args, f.name) for f in fields(settings) if hasattr(args, f.name)}
    return settings(**{**named, **values})


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
