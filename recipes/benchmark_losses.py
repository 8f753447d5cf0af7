"""Time and peak memory of the losses against the host libraries' baselines, in one run.

    python -m recipes.benchmark_losses                 # both sides, default sizes
    python -m recipes.benchmark_losses --side lightly --batch-sizes 128 512 2048
    python -m recipes.benchmark_losses --device cuda

Lightly side: forward+backward of SogCLRLoss, ISogCLRLoss and DySTreSSLoss against
``lightly.loss.NTXentLoss`` (dimension 128). OpenCLIP side: SogCLRClipLoss, ISogCLRClipLoss and
DySTreSSClipLoss against ``open_clip.ClipLoss`` (dimension 512). Then one step of ISogCLRLoss at
num_samples 1e4 and 1e8, to show that a step's cost does not grow with the dataset.

Each measurement runs in a fresh process. Peak memory is the growth of the process's peak
resident set during one forward+backward (with glibc returning large blocks to the system at
once, ``MALLOC_MMAP_THRESHOLD_``), or ``torch.cuda.max_memory_allocated`` on a GPU. Times are the
median of several calls after a warm-up. Ratios are against the baseline at the same batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable

BASELINES = {"lightly": "NTXentLoss", "openclip": "ClipLoss"}
LOSSES = {
    "lightly": ["NTXentLoss", "SogCLRLoss", "ISogCLRLoss", "DySTreSSLoss"],
    "openclip": ["ClipLoss", "SogCLRClipLoss", "ISogCLRClipLoss", "DySTreSSClipLoss"],
}
DEFAULT_BATCHES = {"lightly": [128, 512, 2048], "openclip": [256, 1024, 4096]}
DIMS = {"lightly": 128, "openclip": 512}


def _make_step(
    name: str, batch: int, dim: int, num_samples: int, device: str
) -> Callable[[], None]:
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(batch, dim, generator=g).to(device).requires_grad_()
    b = torch.randn(batch, dim, generator=g).to(device).requires_grad_()
    index = torch.randint(0, num_samples, (batch,), generator=g).to(device)
    if name in LOSSES["lightly"]:
        from lightly.loss import NTXentLoss

        import lightly_tau

        loss = {
            "NTXentLoss": lambda: NTXentLoss(temperature=0.1),
            "SogCLRLoss": lambda: lightly_tau.SogCLRLoss(num_samples),
            "ISogCLRLoss": lambda: lightly_tau.ISogCLRLoss(num_samples),
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
        "DySTreSSClipLoss": lambda: openclip_tau.DySTreSSClipLoss(),
    }[name]().to(device)
    if name in ("ClipLoss", "DySTreSSClipLoss"):
        return lambda: loss(a, b, scale).backward()
    return lambda: loss(a, b, scale, index=index).backward()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(name: str, batch: int, dim: int, num_samples: int, device: str, repeats: int) -> dict:
    import resource

    import torch

    if device == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("BENCH_THREADS", "1"))))
    # Warm up on a tiny batch so that kernels and libraries are loaded before measuring memory.
    _make_step(name, 8, dim, num_samples, device)()
    step = _make_step(name, batch, dim, num_samples, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _resident_bytes()
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"time_s": times[len(times) // 2], "peak_bytes": max(peak, 0)}


def run_child(name: str, batch: int, side: str, num_samples: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", BENCH_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "recipes.benchmark_losses", "--child", name, str(batch)]
    cmd += ["--dim", str(DIMS[side]), "--num-samples", str(num_samples), "--device", args.device]
    cmd += ["--repeats", str(args.repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"benchmark of {name} at batch {batch} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=["lightly", "openclip", "both"], default="both")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="override the default sizes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per measurement")
    parser.add_argument("--skip-scaling", action="store_true", help="skip the num_samples check")
    parser.add_argument("--child", nargs=2, metavar=("LOSS", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--num-samples", type=int, default=100_000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        name, batch = args.child[0], int(args.child[1])
        result = child(name, batch, args.dim, args.num_samples, args.device, args.repeats)
        print(json.dumps(result))
        return 0

    sides = ["lightly", "openclip"] if args.side == "both" else [args.side]
    print(f"device {args.device}, {args.threads} thread(s), median of {args.repeats} calls")
    for side in sides:
        batches = args.batch_sizes or DEFAULT_BATCHES[side]
        print(f"\n{side}: forward+backward, dimension {DIMS[side]}, ratios to {BASELINES[side]}")
        print(f"{'loss':<18}{'batch':>6}{'time ms':>10}{'x time':>8}{'peak MiB':>10}{'x mem':>7}")
        for batch in batches:
            base = None
            for name in LOSSES[side]:
                r = run_child(name, batch, side, max(100_000, batch), args)
                base = base or r
                mem_ratio = r["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else 0.0
                print(
                    f"{name:<18}{batch:>6}{r['time_s'] * 1e3:>10.1f}"
                    f"{r['time_s'] / base['time_s']:>8.2f}{r['peak_bytes'] / 2**20:>10.1f}"
                    f"{mem_ratio:>7.2f}",
                    flush=True,
                )
    if not args.skip_scaling:
        print("\nISogCLRLoss step time against num_samples (batch 512): the state is read and")
        print("written only at the batch's rows, so the time should not grow with the table.")
        small = run_child("ISogCLRLoss", 512, "lightly", 10_000, args)
        large = run_child("ISogCLRLoss", 512, "lightly", 100_000_000, args)
        print(f"num_samples 1e4: {small['time_s'] * 1e3:.1f} ms")
        print(
            f"num_samples 1e8: {large['time_s'] * 1e3:.1f} ms "
            f"({large['time_s'] / small['time_s']:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
