"""Time and peak memory of the losses against the host libraries' baselines, in one run.

    python -m recipes.benchmark_losses                 # both sides, default sizes
    python -m recipes.benchmark_losses --side lightly --batch-sizes 128 512 2048
    python -m recipes.benchmark_losses --device cuda
    python -m recipes.benchmark_losses --tiled --side openclip --batch-sizes 4096 16384 \
        --memory-cap-gib 12 --plot memory.png      # chunk_size > 0 against 0 and ClipLoss

Lightly side: forward+backward of SogCLRLoss, ISogCLRLoss, RGCLGLoss, TempNetLoss and
DySTreSSLoss against ``lightly.loss.NTXentLoss`` (dimension 128). OpenCLIP side: SogCLRClipLoss,
ISogCLRClipLoss, RGCLGClipLoss, TempNetClipLoss and DySTreSSClipLoss against
``open_clip.ClipLoss`` (dimension 512). RGCL-g's and TempNet's times include the backward pass
into their temperature parameter and networks (not the optimizer step). Then one step of ISogCLRLoss at
num_samples 1e4 and 1e8, to show that a step's cost does not grow with the dataset.

Where LibAUC is installed (``pip install libauc --no-deps`` is enough: only its
``libauc/losses/contrastive.py`` is loaded, which needs torch and NumPy), its SogCLR losses are
timed beside ours: ``GCLoss_v1`` (unimodal) and ``GCLoss_v2`` (image-text), each with its
defaults except the table size.

Times: one process per batch size calls every loss once per round, for several rounds after a
warm-up, so that a change in the machine's speed hits all losses of a round alike; a loss's time
is its median over rounds and its ratio the median of its per-round ratios to the baseline. Peak
memory: a fresh process per loss, the growth of its peak resident set during one forward+backward
(with glibc returning large blocks to the system at once, ``MALLOC_MMAP_THRESHOLD_``), or
``torch.cuda.max_memory_allocated`` on a GPU. Ratios are against the baseline at the same batch
size.

``--tiled``: the memory comparison of the tiled losses. Per batch size (image-text 4096 to 65,536
at dimension 512, unimodal 8192 and 32,768 at 128 by default), the baseline, a loss with
``chunk_size=0`` and the same loss with ``--chunk-size``, each in a fresh process for its peak
(and the time of that one step); up to ``--time-up-to`` also interleaved timing rounds, whose
per-round ratios give the time ratios. ``--memory-cap-gib`` keeps a loss that does not fit from
swapping a shared machine: it is reported as not fitting.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from argparse import SUPPRESS
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

BASELINES = {"lightly": "NTXentLoss", "openclip": "ClipLoss"}
LOSSES = {
    "lightly": [
        "NTXentLoss",
        "SogCLRLoss",
        "ISogCLRLoss",
        "RGCLGLoss",
        "TempNetLoss",
        "DySTreSSLoss",
    ],
    "openclip": [
        "ClipLoss",
        "SogCLRClipLoss",
        "ISogCLRClipLoss",
        "RGCLGClipLoss",
        "TempNetClipLoss",
        "DySTreSSClipLoss",
    ],
}
LIBAUC_LOSSES = {"lightly": "LibAUC GCLoss_v1", "openclip": "LibAUC GCLoss_v2"}
DEFAULT_BATCHES = {"lightly": [128, 512, 2048], "openclip": [256, 1024, 4096]}
DIMS = {"lightly": 128, "openclip": 512}
# The tiled comparison: its batch sizes, default chunk size and default loss per side.
TILED_BATCHES = {"lightly": [8192, 32768], "openclip": [4096, 16384, 32768, 65536]}
TILED_CHUNK = 256
TILED_LOSSES = {"lightly": "SogCLRLoss", "openclip": "SogCLRClipLoss"}
# Published by Inf-CL (Cheng et al., arXiv 2410.17243, CVPR 2025), 8x A800, batch 128k:
# loss memory (GB) and seconds per iteration, theirs against OpenCLIP's ClipLoss.
INF_CL_PUBLISHED = {
    "batch": 131072,
    "memory_gb": {"ClipLoss": 33.64, "Inf-CL": 0.72},
    "seconds_per_iteration": {"ClipLoss": 97.9, "Inf-CL": 98.3},
}


def libauc_contrastive() -> Any:
    """LibAUC's ``libauc/losses/contrastive.py`` loaded on its own, or None if not installed.

    The package's ``__init__`` imports every other module (with transformers and
    torch-geometric behind them); the contrastive losses need only torch and NumPy.
    """
    spec = importlib.util.find_spec("libauc")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "losses" / "contrastive.py"
    if not path.exists():
        return None
    module_spec = importlib.util.spec_from_file_location("libauc_contrastive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def losses_of(side: str) -> list[str]:
    """The losses timed on one side: the baseline first, LibAUC's last where installed."""
    names = list(LOSSES[side])
    if importlib.util.find_spec("libauc") is not None:
        names.append(LIBAUC_LOSSES[side])
    return names


def _make_step(
    name: str, batch: int, dim: int, num_samples: int, device: str
) -> Callable[[], None]:
    """One forward+backward of loss ``name`` (``"SogCLRClipLoss@1024"``: with chunk_size 1024)."""
    import torch

    name, _, chunk = name.partition("@")
    tiling = {"chunk_size": int(chunk)} if chunk else {}

    g = torch.Generator().manual_seed(0)
    a = torch.randn(batch, dim, generator=g).to(device).requires_grad_()
    b = torch.randn(batch, dim, generator=g).to(device).requires_grad_()
    index = torch.randint(0, num_samples, (batch,), generator=g).to(device)
    if name.startswith("LibAUC"):
        libauc = libauc_contrastive()
        if name == LIBAUC_LOSSES["lightly"]:
            loss = libauc.GCLoss_v1(N=num_samples, device=torch.device(device))
            return lambda: loss(a, b, index).backward()
        loss = libauc.GCLoss_v2(N=num_samples)
        return lambda: loss(a, b, index)[0].backward()  # (loss, temperatures)
    if name in LOSSES["lightly"]:
        from lightly.loss import NTXentLoss

        import lightly_tau

        loss = {
            "NTXentLoss": lambda: NTXentLoss(temperature=0.1),
            "SogCLRLoss": lambda: lightly_tau.SogCLRLoss(num_samples, **tiling),
            "ISogCLRLoss": lambda: lightly_tau.ISogCLRLoss(num_samples, **tiling),
            "RGCLGLoss": lambda: lightly_tau.RGCLGLoss(num_samples, **tiling),
            "TempNetLoss": lambda: lightly_tau.TempNetLoss(num_samples, dim=dim, **tiling),
            "DySTreSSLoss": lambda: lightly_tau.DySTreSSLoss(**tiling),
        }[name]().to(device)
        if name in ("NTXentLoss", "DySTreSSLoss"):
            return lambda: loss(a, b).backward()
        return lambda: loss(a, b, index).backward()

    import open_clip
    import torch.nn.functional as F

    import openclip_tau

    a.data = F.normalize(a.data, dim=1)
    b.data = F.normalize(b.data, dim=1)
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    loss = {
        "ClipLoss": lambda: open_clip.ClipLoss(),
        "SogCLRClipLoss": lambda: openclip_tau.SogCLRClipLoss(num_samples, **tiling),
        "ISogCLRClipLoss": lambda: openclip_tau.ISogCLRClipLoss(num_samples, **tiling),
        "RGCLGClipLoss": lambda: openclip_tau.RGCLGClipLoss(num_samples, **tiling),
        "TempNetClipLoss": lambda: openclip_tau.TempNetClipLoss(num_samples, dim=dim, **tiling),
        "DySTreSSClipLoss": lambda: openclip_tau.DySTreSSClipLoss(**tiling),
    }[name]().to(device)
    if name in ("ClipLoss", "DySTreSSClipLoss"):
        return lambda: loss(a, b, scale).backward()
    return lambda: loss(a, b, scale, index=index).backward()


def _resident_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _set_threads(device: str) -> None:
    import torch

    if device == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("BENCH_THREADS", "1"))))


def _cap_address_space(cap_gib: float) -> None:
    """Lets this process's address space grow by at most ``cap_gib`` GiB: a loss that does not
    fit fails with an allocation error instead of pushing a shared machine into swap or OOM."""
    import resource

    import psutil

    limit = psutil.Process().memory_info().vms + int(cap_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def child_memory(
    name: str, batch: int, dim: int, num_samples: int, device: str, cap_gib: float = 0.0
) -> dict:
    """Peak memory and time of one forward+backward, in a process that has run nothing bigger.

    With ``cap_gib`` (CPU), a step that needs more fails and returns ``{"peak_bytes": None}``.
    """
    import resource

    import torch

    _set_threads(device)
    # Warm up on a tiny batch so that kernels and libraries are loaded before measuring memory.
    _make_step(name, 8, dim, num_samples, device)()
    if cap_gib > 0 and not device.startswith("cuda"):
        _cap_address_space(cap_gib)
    try:
        step = _make_step(name, batch, dim, num_samples, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() - base
        else:
            base = _resident_bytes()
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    except (MemoryError, RuntimeError) as error:  # torch's CPU allocator raises RuntimeError
        if "memory" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        return {"peak_bytes": None, "time_s": None}
    return {"peak_bytes": max(peak, 0), "time_s": elapsed}


def child_times(
    names: list[str], batch: int, dim: int, num_samples: int, device: str, repeats: int
) -> dict:
    """Times of one forward+backward of every loss in ``names``, interleaved.

    Each round times every loss once with ``torch.utils.benchmark.Timer`` (which synchronises a
    GPU and warms up before each measurement), so a change in the machine's speed (other
    processes, a shared host) hits all losses of a round alike; the ratio to the baseline
    (``names[0]``) is taken within each round and the median over rounds is reported.
    """
    import torch
    from torch.utils.benchmark import Timer

    _set_threads(device)
    threads = torch.get_num_threads()
    timers = {
        name: Timer("step()", globals={"step": _make_step(name, batch, dim, num_samples, device)},
                    num_threads=threads, label=name)
        for name in names
    }  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name, timer in timers.items():
            times[name].append(timer.timeit(1).median)
    base = times[names[0]]
    return {
        name: {
            "time_s": statistics.median(t),
            "ratio": statistics.median(x / y for x, y in zip(t, base)),
        }
        for name, t in times.items()
    }


def _run(args: argparse.Namespace, child_args: list[str], env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "recipes.benchmark_losses", *child_args]
    cmd += ["--device", args.device, "--repeats", str(args.repeats)]
    out = subprocess.run(
        cmd,
        env=dict(os.environ, BENCH_THREADS=str(args.threads), **env),
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"benchmark {' '.join(child_args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_memory(name: str, batch: int, dim: int, num_samples: int, args: argparse.Namespace) -> int:
    return run_memory_and_time(name, batch, dim, num_samples, args)["peak_bytes"]


def run_memory_and_time(
    name: str, batch: int, dim: int, num_samples: int, args: argparse.Namespace
) -> dict:
    # glibc returns large blocks to the system at once, so the peak resident set is the peak use.
    child_args = ["--memory-child", name, str(batch), "--dim", str(dim)]
    child_args += ["--num-samples", str(num_samples), "--memory-cap-gib", str(args.memory_cap_gib)]
    return _run(args, child_args, {"MALLOC_MMAP_THRESHOLD_": "65536"})


def run_times(
    names: list[str], batch: int, dim: int, num_samples: int, args: argparse.Namespace
) -> dict:
    # Default allocator settings: the times a training run would see.
    child_args = ["--time-child", str(batch), *names, "--dim", str(dim)]
    child_args += ["--num-samples", str(num_samples)]
    return _run(args, child_args, {})


def _tiled_rows(side: str, args: argparse.Namespace) -> list[dict]:
    """Memory and time of the baseline, each loss untiled and each loss tiled, per batch."""
    dim, rows = DIMS[side], []
    losses = [n for n in (args.tiled_losses or [TILED_LOSSES[side]]) if n in LOSSES[side]]
    for batch in args.batch_sizes or TILED_BATCHES[side]:
        num_samples = max(100_000, batch)
        names = [BASELINES[side]]
        names += [n for loss in losses for n in (loss, f"{loss}@{args.chunk_size}")]
        times = {}
        if batch <= args.time_up_to:
            times = run_times(names, batch, dim, num_samples, args)
        for name in names:
            measured = run_memory_and_time(name, batch, dim, num_samples, args)
            row = {"side": side, "loss": name, "batch": batch, "dim": dim, **measured}
            if name in times:
                row.update(time_s=times[name]["time_s"], round_ratio=times[name]["ratio"])
            rows.append(row)
            _print_tiled_row(row, rows)
    return rows


def _ratio(x: float | None, y: float | None) -> str:
    return f"{x / y:.3f}" if x and y else "-"


def _print_tiled_row(row: dict, rows: list[dict]) -> None:
    same = [r for r in rows if r["batch"] == row["batch"] and r["side"] == row["side"]]
    base = same[0]
    untiled = next((r for r in same if r["loss"] == row["loss"].partition("@")[0]), row)
    peak = row["peak_bytes"]
    mib = f"{peak / 2**20:.1f}" if peak is not None else "no fit"
    seconds = f"{row['time_s']:.3f}" if row["time_s"] is not None else "-"
    print(
        f"{row['loss']:<22}{row['batch']:>7}{mib:>11}{_ratio(peak, base['peak_bytes']):>9}"
        f"{_ratio(peak, untiled['peak_bytes']):>10}{seconds:>10}"
        f"{_ratio(row['time_s'], base['time_s']):>8}{_ratio(row['time_s'], untiled['time_s']):>10}",
        flush=True,
    )


def run_tiled(args: argparse.Namespace, sides: list[str]) -> int:
    """The tiled comparison: a fresh process per (loss, batch) for its peak, times interleaved."""
    print(
        f"device {args.device}, {args.threads} thread(s), chunk_size {args.chunk_size}; peak: one "
        "fresh process per loss and batch; time: median of interleaved rounds up to batch "
        f"{args.time_up_to} ({args.repeats} rounds), above it the one step of the peak's process"
    )
    rows = []
    for side in sides:
        print(f"\n{side}: forward+backward, dimension {DIMS[side]}; x base: to {BASELINES[side]}")
        print(
            f"{'loss':<22}{'batch':>7}{'peak MiB':>11}{'x base':>9}{'x untiled':>10}"
            f"{'time s':>10}{'x base':>8}{'x untiled':>10}"
        )
        rows += _tiled_rows(side, args)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "inf_cl": INF_CL_PUBLISHED}, indent=1))
    if args.plot:
        plot_memory(rows, args.plot)
    return 0


def plot_memory(rows: list[dict], path: Path) -> None:
    """Peak memory against batch size per loss (log-log), Inf-CL's published pair beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = sorted({r["side"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(sides), figsize=(6.5 * len(sides), 4.5), squeeze=False)
    for ax, side in zip(axes[0], sides):
        for loss in dict.fromkeys(r["loss"] for r in rows if r["side"] == side):
            points = [
                (r["batch"], r["peak_bytes"] / 2**30)
                for r in rows
                if r["side"] == side and r["loss"] == loss and r["peak_bytes"]
            ]
            label = loss.replace("@", " chunk_size=") if "@" in loss else loss
            ax.plot(*zip(*points), marker="o", label=label)
        if side == "openclip":
            published = INF_CL_PUBLISHED
            for (name, gb), color in zip(published["memory_gb"].items(), ("black", "grey")):
                ax.scatter(
                    [published["batch"]], [gb * 1e9 / 2**30], marker="*", s=140, color=color,
                    label=f"{name}: Inf-CL's published figure (8x A800, loss memory)",
                )  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("peak memory of forward+backward (GiB)")
        ax.set_title(f"{side} (dimension {DIMS[side]})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@dataclass
class BenchmarkOptions:
    """Benchmark options.

    Args:
        side: the host library whose losses are timed (both: one after the other)
        batch_sizes: override the default sizes
        device: cpu or cuda
        repeats: timed rounds per batch size
        threads: CPU threads per measurement
        skip_scaling: skip the num_samples check
        tiled: compare the tiled losses (chunk_size > 0) with chunk_size=0 and the baselines at
            large batches (see --chunk-size, --tiled-losses, --time-up-to, --plot)
        chunk_size: chunk_size of the tiled losses
        tiled_losses: losses compared tiled and untiled (default SogCLRLoss SogCLRClipLoss)
        time_up_to: interleaved timing rounds up to this batch; above it one timed step per
            process
        memory_cap_gib: growth of a measuring process's address space at most this (CPU; 0: no
            cap); a loss that needs more is reported as not fitting
        json: write the tiled comparison's rows here
        plot: plot the tiled comparison's memory here
    """

    side: Literal["lightly", "openclip", "both"] = "both"
    batch_sizes: list[int] = field(default_factory=list)
    device: str = "cpu"
    repeats: int = 7
    threads: int = 1
    skip_scaling: bool = False
    tiled: bool = False
    chunk_size: int = TILED_CHUNK
    tiled_losses: list[str] = field(default_factory=list)
    time_up_to: int = 16_384
    memory_cap_gib: float = 0.0
    json: Optional[Path] = None
    plot: Optional[Path] = None


def parse_args(argv: list[str] | None) -> Any:
    """The command line, generated from :class:`BenchmarkOptions`; the child processes' own
    flags are hidden."""
    from recipes.cli_args import ArgumentParser, add_dataclass

    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataclass(parser, BenchmarkOptions, title="benchmark")
    hidden = {"help": SUPPRESS}
    parser.add_argument("--memory-child", nargs=2, metavar=("LOSS", "BATCH"), **hidden)
    parser.add_argument("--time-child", nargs="+", metavar="BATCH LOSS", **hidden)
    parser.add_argument("--dim", type=int, default=128, **hidden)
    parser.add_argument("--num-samples", type=int, default=100_000, **hidden)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    if args.memory_child:
        name, batch = args.memory_child[0], int(args.memory_child[1])
        result = child_memory(
            name, batch, args.dim, args.num_samples, args.device, args.memory_cap_gib
        )
        print(json.dumps(result))
        return 0
    if args.time_child:
        batch, names = int(args.time_child[0]), args.time_child[1:]
        result = child_times(names, batch, args.dim, args.num_samples, args.device, args.repeats)
        print(json.dumps(result))
        return 0

    sides = ["lightly", "openclip"] if args.side == "both" else [args.side]
    if args.tiled:
        return run_tiled(args, sides)
    print(
        f"device {args.device}, {args.threads} thread(s); time: median of {args.repeats} rounds "
        "with every loss called once per round, ratio taken within each round"
    )
    for side in sides:
        batches = args.batch_sizes or DEFAULT_BATCHES[side]
        dim = DIMS[side]
        print(f"\n{side}: forward+backward, dimension {dim}, ratios to {BASELINES[side]}")
        print(f"{'loss':<18}{'batch':>6}{'time ms':>10}{'x time':>8}{'peak MiB':>10}{'x mem':>7}")
        for batch in batches:
            num_samples = max(100_000, batch)
            names = losses_of(side)
            times = run_times(names, batch, dim, num_samples, args)
            base_bytes = None
            for name in names:
                peak = run_memory(name, batch, dim, num_samples, args)
                base_bytes = base_bytes or peak
                print(
                    f"{name:<18}{batch:>6}{times[name]['time_s'] * 1e3:>10.1f}"
                    f"{times[name]['ratio']:>8.2f}{peak / 2**20:>10.1f}"
                    f"{peak / base_bytes if base_bytes else 0.0:>7.2f}",
                    flush=True,
                )
    if not args.skip_scaling:
        print("\nISogCLRLoss step time against num_samples (batch 512): the state is read and")
        print("written only at the batch's rows, so the time should not grow with the table.")
        small = run_times(["ISogCLRLoss"], 512, DIMS["lightly"], 10_000, args)["ISogCLRLoss"]
        large = run_times(["ISogCLRLoss"], 512, DIMS["lightly"], 100_000_000, args)["ISogCLRLoss"]
        print(f"num_samples 1e4: {small['time_s'] * 1e3:.1f} ms")
        print(
            f"num_samples 1e8: {large['time_s'] * 1e3:.1f} ms "
            f"({large['time_s'] / small['time_s']:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
