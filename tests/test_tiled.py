"""The tiled losses (``chunk_size > 0``) equal the untiled ones (``chunk_size=0``).

For every loss of both hosts, over several steps with revisited and duplicated indices: the
returned values, the gradients with respect to both feature tensors, the gradients of the
temperature's parameters (RGCL-g's ``logit_scale``, TempNet's networks), the statistics and the
state tables agree to float32 round-off, for chunk sizes that divide the anchors' rows and ones
that do not, under bf16 autocast, and in a two-process gloo group (each rank tiles its anchors
against the gathered candidates). A dispatch-level trace shows that no tensor of the block's size
is ever created.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _dist_utils import run_on_ranks
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import lightly_tau
import openclip_tau

NUM_SAMPLES = 24
BATCH = 10
DIM = 8
UNIMODAL = {
    "SogCLRLoss": (lightly_tau.SogCLRLoss, {"temperature": 0.2, "gamma": 0.7}),
    "ISogCLRLoss": (
        lightly_tau.ISogCLRLoss,
        {"rho": 0.4, "tau_init": 0.2, "eta": 0.5, "beta": 0.6, "gamma": 0.7},
    ),
    "RGCLGLoss": (lightly_tau.RGCLGLoss, {"rho": 0.4, "tau_init": 0.2, "gamma": 0.7}),
    "TempNetLoss": (lightly_tau.TempNetLoss, {"dim": DIM, "gamma": 0.7, "tau_min": 0.1}),
    "DySTreSSLoss": (lightly_tau.DySTreSSLoss, {"tau_min": 0.1, "tau_max": 0.3}),
}
IMAGE_TEXT = {
    "SogCLRClipLoss": (openclip_tau.SogCLRClipLoss, {"temperature": 0.05, "gamma": 0.7}),
    "ISogCLRClipLoss": (
        openclip_tau.ISogCLRClipLoss,
        {"rho": 1.0, "tau_init": 0.1, "tau_min": 0.02, "eta": 0.2, "gamma": 0.7},
    ),
    "RGCLGClipLoss": (openclip_tau.RGCLGClipLoss, {"rho": 1.0, "gamma": 0.7}),
    "TempNetClipLoss": (openclip_tau.TempNetClipLoss, {"dim": DIM, "rho": 1.0, "gamma": 0.7}),
    "DySTreSSClipLoss": (openclip_tau.DySTreSSClipLoss, {"tau_min": 0.05, "tau_max": 0.15}),
}
LOSSES = {**UNIMODAL, **IMAGE_TEXT}
STATELESS = ("DySTreSSLoss", "DySTreSSClipLoss")
# Unimodal blocks have 2 * BATCH = 20 anchor rows, image-text ones BATCH = 10.
CHUNKS = (1, 3, 7, 10, 64)


def build(name: str, chunk_size: int, world_size: int = 1, rank: int = 0) -> torch.nn.Module:
    cls, kwargs = LOSSES[name]
    kwargs = dict(kwargs, chunk_size=chunk_size)
    if name in IMAGE_TEXT:
        kwargs.update(rank=rank, world_size=world_size)
    elif world_size > 1:
        kwargs["gather_distributed"] = True
    if name in STATELESS:
        return cls(**kwargs)
    return cls(NUM_SAMPLES, **kwargs)


def index_schedule(global_batch: int) -> list[Tensor]:
    """Indices of each step: revisits, and a step with an index twice in the batch."""
    g = torch.Generator().manual_seed(7)
    steps = [torch.randperm(NUM_SAMPLES, generator=g)[:global_batch] for _ in range(3)]
    steps[1][3] = steps[1][0]
    steps[1][-1] = steps[1][1]  # on the last rank in the distributed case
    return steps


def run(
    name: str,
    chunk_size: int,
    world_size: int = 1,
    rank: int = 0,
    autocast: bool = False,
    train: bool = True,
) -> dict[str, Any]:
    """Three steps of the loss on this rank's slice of fixed global batches."""
    torch.manual_seed(0)
    loss_fn = build(name, chunk_size, world_size, rank)
    loss_fn.train(train)
    params = loss_fn.temperature_parameters() if hasattr(loss_fn, "param_groups") else []
    g = torch.Generator().manual_seed(11)
    record: dict[str, list[Any]] = {"value": [], "grads": [], "stats": [], "tables": []}
    for global_index in index_schedule(BATCH * world_size):
        x0 = torch.randn(len(global_index), DIM, generator=g)
        x1 = torch.randn(len(global_index), DIM, generator=g)
        x0 = x0 + 0.8 * x1  # positives closer than negatives, as after some training
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        f0 = x0[rows].clone().requires_grad_(True)
        f1 = x1[rows].clone().requires_grad_(True)
        index = global_index[rows]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            a, b = (f0.bfloat16(), f1.bfloat16()) if autocast else (f0, f1)
            if name in UNIMODAL:
                value = loss_fn(a, b, index)
            else:
                value = loss_fn(a, b, None, index=index)
        grads = torch.autograd.grad(value, [f0, f1, *params], allow_unused=True)
        record["value"].append(value.detach())
        record["grads"].append([torch.zeros(()) if x is None else x for x in grads])
        record["stats"].append(loss_fn.stats)
        state = getattr(loss_fn, "state", None)
        tables = {} if state is None else {n: state.table(n) for n in state.names}
        record["tables"].append(tables)
    return record


def assert_same(tiled: dict[str, Any], untiled: dict[str, Any]) -> None:
    close = {"rtol": 2e-5, "atol": 2e-7, "equal_nan": True}
    # Tables and statistics hold differences of order-1 terms (the temperature gradient).
    loose = {"rtol": 1e-4, "atol": 1e-5, "equal_nan": True}
    for step in range(len(untiled["value"])):
        torch.testing.assert_close(tiled["value"][step], untiled["value"][step], **close)
        assert len(tiled["grads"][step]) == len(untiled["grads"][step])
        for got, want in zip(tiled["grads"][step], untiled["grads"][step]):
            assert want.abs().max() > 0  # every gradient checked is really there
            torch.testing.assert_close(got, want, **close)
        assert tiled["stats"][step].keys() == untiled["stats"][step].keys()
        for key, want in untiled["stats"][step].items():
            torch.testing.assert_close(tiled["stats"][step][key], want, **loose)
        assert tiled["tables"][step].keys() == untiled["tables"][step].keys()
        for key, want in untiled["tables"][step].items():
            torch.testing.assert_close(tiled["tables"][step][key], want, **loose)


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("name", LOSSES)
def test_tiled_equals_untiled(name: str, chunk_size: int) -> None:
    assert_same(run(name, chunk_size), run(name, 0))


@pytest.mark.parametrize("name", LOSSES)
def test_tiled_equals_untiled_under_bf16_autocast(name: str) -> None:
    assert_same(run(name, 3, autocast=True), run(name, 0, autocast=True))


@pytest.mark.parametrize("name", ["ISogCLRLoss", "TempNetClipLoss", "DySTreSSClipLoss"])
def test_tiled_evaluation_reads_without_writing(name: str) -> None:
    """In eval mode (or without gradients) the tiled loss reads the state, as the untiled one."""
    tiled, untiled = run(name, 4, train=False), run(name, 0, train=False)
    assert_same(tiled, untiled)
    loss_fn = build(name, 4)
    loss_fn.eval()
    f = torch.randn(BATCH, DIM)
    with torch.no_grad():
        if name in UNIMODAL:
            value = loss_fn(f, f.flip(0), torch.arange(BATCH))
        else:
            value = loss_fn(f, f.flip(0), None, index=torch.arange(BATCH))
    assert torch.isfinite(value) and not value.requires_grad


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("name", ["SogCLRLoss", "TempNetLoss", "ISogCLRClipLoss", "DySTreSSLoss"])
def test_no_block_sized_tensor_is_created(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward and backward of a tiled loss create nothing of size (rows, cols): the largest
    tensor is a tile (chunk_size x cols) or the features, never the block (DySTreSS's statistics
    sample at most ``STATS_PAIRS`` pairs, a constant, made small here)."""
    import tau_core.dystress

    monkeypatch.setattr(tau_core.dystress, "STATS_PAIRS", 512)
    batch, dim, chunk = 96, 16, 8
    cls, kwargs = LOSSES[name]
    if "dim" in kwargs:  # a small network: its (rows, prototypes) activations stay small
        kwargs = dict(kwargs, dim=dim, num_prototypes=16)
    kwargs = dict(kwargs, chunk_size=chunk)
    loss_fn = cls(**kwargs) if name in STATELESS else cls(batch, **kwargs)
    f0 = torch.randn(batch, dim, requires_grad=True)
    f1 = torch.randn(batch, dim, requires_grad=True)
    index = torch.arange(batch)
    rows = 2 * batch if name in UNIMODAL else batch
    with _LargestTensor() as trace:
        value = loss_fn(f0, f1, index) if name in UNIMODAL else loss_fn(f0, f1, None, index=index)
        value.backward()
    assert trace.largest <= max(chunk * rows, 2 * batch * dim)
    assert trace.largest < rows * rows // 4


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8", None])
@pytest.mark.parametrize("name", LOSSES)
def test_chunk_size_is_checked(name: str, bad: object) -> None:
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 0"):
        build(name, bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------- two gloo processes

DISTRIBUTED_CHUNKS = (3, 16)


def _rank_runs(rank: int, world_size: int, names: tuple[str, ...]) -> dict[str, Any]:
    return {
        (name, chunk): run(name, chunk, world_size, rank)
        for name in names
        for chunk in (0, *DISTRIBUTED_CHUNKS)
    }


@pytest.mark.slow
def test_tiled_equals_untiled_on_two_ranks(tmp_path: Any) -> None:
    """Each rank tiles its anchors against the gathered candidates: per rank, values, feature
    and temperature gradients, statistics and (replicated) tables equal chunk_size=0's."""
    names = tuple(LOSSES)
    results = run_on_ranks(_rank_runs, tmp_path, names, world_size=2)
    for name in names:
        for per_rank in results:
            for chunk in DISTRIBUTED_CHUNKS:
                assert_same(per_rank[(name, chunk)], per_rank[(name, 0)])


@pytest.mark.parametrize("loss", ["sogclr", "isogclr", "rgclg", "tempnet", "dystress"])
def test_train_option_passes_chunk_size(loss: str) -> None:
    from openclip_tau import train

    options, rest = train.parse_loss_args(["--loss", loss, "--tau-chunk-size", "512", "--x", "1"])
    assert rest == ["--x", "1"]
    built = train.build_loss(loss, train.loss_kwargs(options), num_samples=8, dim=4)
    assert built.chunk_size == 512
    assert train.build_loss(loss, {}, num_samples=8, dim=4).chunk_size == 0


def test_train_option_rejects_a_negative_chunk_size(capsys: pytest.CaptureFixture) -> None:
    from openclip_tau import train

    with pytest.raises(SystemExit) as exit_info:
        train.parse_loss_args(["--loss", "sogclr", "--tau-chunk-size", "-1"])
    assert exit_info.value.code == 2
    assert "--tau-chunk-size must be an integer >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("cls", [openclip_tau.SogCLRClipLoss, openclip_tau.ISogCLRClipLoss])
def test_tiled_image_text_at_small_temperatures(cls: type) -> None:
    """At tau 0.005 exp(h / tau) spans hundreds of orders of magnitude: the online column
    statistics of the text anchors stay as accurate as the untiled rows."""
    kwargs = {"temperature": 0.005} if cls is openclip_tau.SogCLRClipLoss else {"tau_init": 0.005}
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(40, DIM, generator=g)
    x0 = x1 + 0.5 * torch.randn(40, DIM, generator=g)
    index = torch.arange(40)
    out = []
    for chunk in (0, 6):
        loss_fn = cls(40, chunk_size=chunk, **kwargs)
        f0, f1 = x0.clone().requires_grad_(), x1.clone().requires_grad_()
        value = loss_fn(f0, f1, None, index=index)
        value = loss_fn(f0, f1, None, index=index)  # a second visit: gamma < 1
        tables = [loss_fn.state.table(name) for name in loss_fn.state.names]
        out.append([value, *torch.autograd.grad(value, [f0, f1]), *tables])
    for got, want in zip(*out):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_benchmark_tiled_mode_runs(tmp_path: Any, capsys: pytest.CaptureFixture) -> None:
    """The benchmark's tiled comparison at a tiny size: rows, ratios, the JSON and the plot."""
    import json

    from recipes import benchmark_losses

    out, plot = tmp_path / "rows.json", tmp_path / "memory.png"
    argv = ["--tiled", "--side", "lightly", "--batch-sizes", "64", "--repeats", "1"]
    argv += ["--chunk-size", "16", "--json", str(out), "--plot", str(plot)]
    assert benchmark_losses.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["loss"] for r in rows] == ["NTXentLoss", "SogCLRLoss", "SogCLRLoss@16"]
    assert all(r["peak_bytes"] is not None and r["time_s"] > 0 for r in rows)
    assert plot.stat().st_size > 0
    assert "SogCLRLoss@16" in capsys.readouterr().out
