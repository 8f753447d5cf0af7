"""Memory per rank and step time of the per-sample state: replicated against sharded.

For each table size N, a fresh group of ``--world-size`` gloo processes on the CPU builds
``ISogCLRClipLoss(N)`` (6 tables: log_u, tau and momentum per image and per text anchor, 24 bytes
per sample) in one layout and trains it on random features and indices drawn from [0, N):

- memory: each rank's resident set (``VmRSS``, read with psutil) after the loss is built
  (both layouts allocate and fill their tables then) minus before, beside the arithmetic
  (4 bytes x tables x rows); "+ step" is the growth until after the first step (the autograd
  and collective buffers of one batch, the same in both layouts);
- time: the median over ``--steps`` steps of one forward and backward (the loss step), and of the
  state's own read and write of a batch (what the layout changes), after ``--warmup`` steps.

Every (N, layout) runs in new processes so that one run's memory does not count in the next.
Prints one line per run and the ratios sharded / replicated. N = 1e8 runs only when the machine
has the memory for the replicated run (``MemAvailable``, read with psutil)::

    .venv/bin/python -m recipes.benchmark_state_memory --world-size 2 --num-samples 1e6 1e7 1e8
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import tempfile
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import psutil
import torch
from torch import distributed as torch_dist
from torch.utils.benchmark import Measurement, Timer

from openclip_tau import ISogCLRClipLoss
from tau_core.state import (
    EXCHANGES,
    describe_state_memory,
    format_bytes,
    state_bytes_per_rank,
)

TABLES = 6  # ISogCLRClipLoss: log_u, tau, momentum for the image and the text anchors


def resident_bytes() -> int:
    """This process's resident set size (``VmRSS``), in bytes (psutil)."""
    return psutil.Process().memory_info().rss


def available_bytes() -> int:
    """The memory available to new processes (``MemAvailable``), in bytes (psutil)."""
    return psutil.virtual_memory().available


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str, config: dict[str, Any]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    torch_dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600)
    )
    try:
        torch.save(measure(rank, world, config), Path(out) / f"rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


def measure(rank: int, world: int, config: dict[str, Any]) -> dict[str, Any]:
    """One rank's memory and step times for one table size and layout."""
    n, batch, dim = config["num_samples"], config["batch"], config["dim"]
    g = torch.Generator().manual_seed(1000 + rank)

    def batch_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=1)
        b = torch.nn.functional.normalize(a + 0.5 * torch.randn(batch, dim, generator=g), dim=1)
        return a, b, torch.randint(0, n, (batch,), generator=g)

    data = [batch_data() for _ in range(4)]
    torch_dist.barrier()
    before = resident_bytes()
    loss = ISogCLRClipLoss(
        n, rank=rank, world_size=world, state_layout=config["layout"], tau_init=0.03, rho=1.0
    )
    if config["layout"] == "sharded":
        loss.state.exchange = config["exchange"]
    torch_dist.barrier()
    built = resident_bytes()  # both layouts allocate (and fill) their tables when built

    def loss_step(k: int) -> None:
        a, b, index = data[k % len(data)]
        a = a.clone().requires_grad_(True)
        b = b.clone().requires_grad_(True)
        loss(a, b, None, index=index).backward()

    loss_step(0)
    torch_dist.barrier()
    stepped = resident_bytes()

    def state_step(k: int) -> None:
        index = data[k % len(data)][2]
        rows = loss.state.read(index)
        loss.state.write(index, rows)

    times = {
        name: median_step_seconds(fn, config["warmup"], config["steps"])
        for name, fn in (("loss_step", loss_step), ("state_step", state_step))
    }
    return {
        "rss": built - before,
        "rss_after_step": stepped - before,
        "expected": state_bytes_per_rank(loss, world),
        "line": describe_state_memory(loss),
        **times,
    }


def median_step_seconds(step: Callable[[int], None], warmup: int, steps: int) -> float:
    """Median seconds of ``step(k)`` over ``steps`` calls after ``warmup`` untimed ones, each
    timed call started together on every rank (``torch.utils.benchmark.Timer`` with a barrier
    as its setup).

    A fixed count of calls: an adaptive one (``blocked_autorange``) could differ between ranks
    and hang their collectives. Each ``timeit(1)`` also runs ``Timer``'s own two warm-up calls.
    """
    calls = itertools.count()
    timer = Timer(
        "step(next(calls))",
        setup="barrier()",
        globals={"step": step, "calls": calls, "barrier": torch_dist.barrier},
        num_threads=torch.get_num_threads(),
    )
    for _ in range(warmup):
        step(next(calls))
    return Measurement.merge([timer.timeit(1) for _ in range(steps)])[0].median


def run(num_samples: int, layout: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every rank's measurements for one table size and layout, in new processes."""
    config = {
        "num_samples": num_samples,
        "layout": layout,
        "batch": args.batch,
        "dim": args.dim,
        "steps": args.steps,
        "warmup": args.warmup,
        "exchange": args.exchange,
    }
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(
            _rank,
            args=(args.world_size, _free_port(), out, config),
            nprocs=args.world_size,
            join=True,
        )
        return [torch.load(Path(out) / f"rank{r}.pt") for r in range(args.world_size)]


@dataclass
class StateMemoryOptions:
    """Benchmark options.

    Args:
        world_size: gloo processes (at least 2)
        num_samples: table sizes
        batch: local batch
        dim: feature dimension
        steps: timed steps
        warmup: untimed steps
        exchange: the sharded state's exchange (auto: all_to_all with CPU tensors on gloo)
    """

    world_size: int = 2
    num_samples: list[float] = field(default_factory=lambda: [1e6, 1e7, 1e8])
    batch: int = 256
    dim: int = 128
    steps: int = 20
    warmup: int = 3
    exchange: str = "auto"


def main(argv: Optional[Sequence[str]] = None) -> None:
    from recipes.cli_args import ArgumentParser, add_dataclass

    parser = ArgumentParser(description=__doc__.split("\n")[0])
    add_dataclass(parser, StateMemoryOptions, title="benchmark")
    args = parser.parse_args(argv)
    if args.world_size < 2:
        parser.error("--world-size must be at least 2 (sharding over one rank changes nothing)")
    if args.exchange not in EXCHANGES:
        parser.error(f"--exchange must be one of {', '.join(EXCHANGES)}, got {args.exchange!r}")
    print(
        f"ISogCLRClipLoss ({TABLES} tables), {args.world_size} gloo processes on CPU, local batch "
        f"{args.batch}, dim {args.dim}; medians of {args.steps} steps; sharded exchange "
        f"{args.exchange}\n"
    )
    header = (
        f"{'N':>12} {'layout':>10} {'RSS per rank':>14} {'+ step':>10} {'arithmetic':>12} "
        f"{'loss step ms':>13} {'state r+w ms':>13}"
    )
    print(header)
    ratios = []
    for value in args.num_samples:
        n = int(value)
        need = 1.5 * args.world_size * 4 * TABLES * n  # replicated, with headroom
        if need > available_bytes():
            print(
                f"{n:>12,} skipped: the replicated run needs about {format_bytes(need)} and "
                f"{format_bytes(available_bytes())} is available"
            )
            continue
        result = {}
        for layout in ("replicated", "sharded"):
            ranks = run(n, layout, args)
            rss = statistics.mean(r["rss"] for r in ranks)
            grown = statistics.mean(r["rss_after_step"] - r["rss"] for r in ranks)
            loss_ms = 1e3 * statistics.mean(r["loss_step"] for r in ranks)
            state_ms = 1e3 * statistics.mean(r["state_step"] for r in ranks)
            result[layout] = (rss, loss_ms, state_ms)
            print(
                f"{n:>12,} {layout:>10} {format_bytes(rss):>14} {format_bytes(grown):>10} "
                f"{format_bytes(ranks[0]['expected']):>12} {loss_ms:>13.2f} {state_ms:>13.2f}"
            )
            print(f"{'':>12} {ranks[0]['line']}")
        (rss_r, loss_r, state_r), (rss_s, loss_s, state_s) = result["replicated"], result["sharded"]
        ratios.append((n, rss_s / rss_r, loss_s / loss_r, state_s / state_r))
    print("\nsharded / replicated")
    print(f"{'N':>12} {'memory':>8} {'loss step':>10} {'state r+w':>10}")
    for n, memory, step, state in ratios:
        print(f"{n:>12,} {memory:>8.3f} {step:>10.2f} {state:>10.2f}")


if __name__ == "__main__":
    main()
