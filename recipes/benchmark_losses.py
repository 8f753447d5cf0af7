"""Time and peak memory of the losses against the host libraries' baselines, in one run.

    python -m recipes.benchmark_losses                 # both sides, default sizes
    python -m recipes.benchmark_losses --side lightly --batch-sizes 128 512 2048
    python -m recipes.benchmark_losses --device cuda

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
from pathlib import Path
from typing import Any, Callable

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
    import torch

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
            "SogCLRLoss": lambda: lightly_tau.SogCLRLoss(num_samples),
            "ISogCLRLoss": lambda: lightly_tau.ISogCLRLoss(num_samples),
            "RGCLGLoss": lambda: lightly_tau.RGCLGLoss(num_samples),
            "TempNetLoss": lambda: lightly_tau.TempNetLoss(num_samples, dim=dim),
            "DySTreSSLoss": lambda: lightly_tau.DySTreSSLoss(),
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
        "SogCLRClipLoss": lambda: openclip_tau.SogCLRClipLoss(num_samples),
        "ISogCLRClipLoss": lambda: openclip_tau.ISogCLRClipLoss(num_samples),
        "RGCLGClipLoss": lambda: openclip_tau.RGCLGClipLoss(num_samples),
        "TempNetClipLoss": lambda: openclip_tau.TempNetClipLoss(num_samples, dim=dim),
        "DySTreSSClipLoss": lambda: openclip_tau.DySTreSSClipLoss(),
    }[name]().to(device)
    if name in ("ClipLoss", "DySTreSSClipLoss"):
        return lambda: loss(a, b, scale).backward()
    return lambda: loss(a, b, scale, index=index).backward()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _set_threads(device: str) -> None:
    import torch

    if device == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("BENCH_THREADS", "1"))))


def child_memory(name: str, batch: int, dim: int, num_samples: int, device: str) -> dict:
    """Peak memory of one forward+backward, in a process that has run nothing bigger."""
    import resource

    import torch

    _set_threads(device)
    # Warm up on a tiny batch so that kernels and libraries are loaded before measuring memory.
    _make_step(name, 8, dim, num_samples, device)()
    step = _make_step(name, batch, dim, num_samples, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _resident_bytes()
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_bytes": max(peak, 0)}


def child_times(
    names: list[str], batch: int, dim: int, num_samples: int, device: str, repeats: int
) -> dict:
    """Times of one forward+backward of every loss in ``names``, interleaved.

    Each round calls every loss once, so a change in the machine's speed (other processes, a
    shared host) hits all losses of a round alike; the ratio to the baseline (``names[0]``) is
    taken within each round and the median over rounds is reported.
    """
    import torch

    _set_threads(device)
    steps = {name: _make_step(name, batch, dim, num_samples, device) for name in names}
    for step in steps.values():
        step()  # warm-up
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
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
    # glibc returns large blocks to the system at once, so the peak resident set is the peak use.
    child_args = ["--memory-child", name, str(batch), "--dim", str(dim)]
    child_args += ["--num-samples", str(num_samples)]
    return _run(args, child_args, {"MALLOC_MMAP_THRESHOLD_": "65536"})["peak_bytes"]


def run_times(
    names: list[str], batch: int, dim: int, num_samples: int, args: argparse.Namespace
) -> dict:
    # Default allocator settings: the times a training run would see.
    child_args = ["--time-child", str(batch), *names, "--dim", str(dim)]
    child_args += ["--num-samples", str(num_samples)]
    return _run(args, child_args, {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=["lightly", "openclip", "both"], default="both")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="override the default sizes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per batch size")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per measurement")
    parser.add_argument("--skip-scaling", action="store_true", help="skip the num_samples check")
    parser.add_argument(
        "--memory-child", nargs=2, metavar=("LOSS", "BATCH"), help=argparse.SUPPRESS
    )
    parser.add_argument("--time-child", nargs="+", metavar="BATCH LOSS", help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--num-samples", type=int, default=100_000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child:
        name, batch = args.memory_child[0], int(args.memory_child[1])
        print(json.dumps(child_memory(name, batch, args.dim, args.num_samples, args.device)))
        return 0
    if args.time_child:
        batch, names = int(args.time_child[0]), args.time_child[1:]
        result = child_times(names, batch, args.dim, args.num_samples, args.device, args.repeats)
        print(json.dumps(result))
        return 0

    sides = ["lightly", "openclip"] if args.side == "both" else [args.side]
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
