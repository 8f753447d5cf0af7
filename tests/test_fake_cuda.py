"""The CUDA code paths of every loss, run on fake CUDA tensors (no GPU needed).

``FakeTensorMode`` gives tensors on ``cuda:0`` that carry shapes, dtypes and devices but no data
(the installed torch is a CUDA build), and it raises on every host-device synchronisation: an
``.item()``/``.tolist()`` (``aten._local_scalar_dense``) or an operation whose output shape
depends on the values (``nonzero``, boolean masks). So a step that completes here takes the CUDA
branches (deferred value checks with their pinned host copy and event, state tables on the GPU)
and never waits for the device. The CUDA runtime calls (events) are replaced by stand-ins through
``tau_core.device``, the only place the core makes them.

The autograd engine needs a real CUDA context to run a backward pass on CUDA tensors (it asks
for the device's streams), so the backward of a whole step runs here on fake CPU tensors (the
same graph: the losses have no device-specific backward code), and each custom backward of the
core on fake CUDA tensors.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
from torch import Tensor
from torch import distributed as torch_dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lightly_tau
import openclip_tau
import tau_core.device
from openclip_tau import train as openclip_train
from tau_core.functional import _WeightedSimilaritySum

CUDA = torch.device("cuda", 0)
BATCH, DIM, NUM_SAMPLES = 8, 16, 64
aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.nonzero.default}

UNIMODAL: dict[str, Callable[[str], Any]] = {
    "SogCLRLoss": lambda layout: lightly_tau.SogCLRLoss(NUM_SAMPLES, state_layout=layout),
    "ISogCLRLoss": lambda layout: lightly_tau.ISogCLRLoss(NUM_SAMPLES, state_layout=layout),
    "RGCLGLoss": lambda layout: lightly_tau.RGCLGLoss(NUM_SAMPLES, state_layout=layout),
    "TempNetLoss": lambda layout: lightly_tau.TempNetLoss(
        NUM_SAMPLES, dim=DIM, num_prototypes=8, state_layout=layout
    ),
    "DySTreSSLoss": lambda layout: lightly_tau.DySTreSSLoss(),
}
IMAGE_TEXT: dict[str, Callable[[str], Any]] = {
    "SogCLRClipLoss": lambda layout: openclip_tau.SogCLRClipLoss(NUM_SAMPLES, state_layout=layout),
    "ISogCLRClipLoss": lambda layout: openclip_tau.ISogCLRClipLoss(
        NUM_SAMPLES, state_layout=layout
    ),
    "RGCLGClipLoss": lambda layout: openclip_tau.RGCLGClipLoss(NUM_SAMPLES, state_layout=layout),
    "TempNetClipLoss": lambda layout: openclip_tau.TempNetClipLoss(
        NUM_SAMPLES, dim=DIM, num_prototypes=8, state_layout=layout
    ),
    "DySTreSSClipLoss": lambda layout: openclip_tau.DySTreSSClipLoss(),
}
STATELESS = {"DySTreSSLoss", "DySTreSSClipLoss"}
CASES = [
    (name, layout)
    for name in (*UNIMODAL, *IMAGE_TEXT)
    for layout in (("replicated",) if name in STATELESS else ("replicated", "sharded"))
]


class FakeEvent:
    """Stands in for ``torch.cuda.Event``: records where it was recorded and how it was asked."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.queries = 0
        self.waited = False


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[FakeEvent]:
    """Routes tau_core.device's runtime calls to stand-ins; the verdicts read back as valid."""
    made: list[FakeEvent] = []

    def record_event(device: torch.device) -> FakeEvent | None:
        if device.type != "cuda":
            return None
        made.append(FakeEvent(device))
        return made[-1]

    def event_ready(event: FakeEvent | None) -> bool:
        if event is not None:
            event.queries += 1
        return True

    def wait_event(event: FakeEvent | None) -> None:
        if event is not None:
            event.waited = True

    def host_values(host: Tensor) -> list:
        # A fake tensor has no values: read back "no NaN, indices from 0 to NUM_SAMPLES - 1".
        assert host.device.type == "cpu" and host.dtype == torch.long
        assert host.numel() in (3, 5)  # (failed, NaN flags) and, with an index, its -min, max
        return [0, 0, 0, 0, NUM_SAMPLES - 1][: host.numel()]

    monkeypatch.setattr(tau_core.device, "record_event", record_event)
    monkeypatch.setattr(tau_core.device, "event_ready", event_ready)
    monkeypatch.setattr(tau_core.device, "wait_event", wait_event)
    monkeypatch.setattr(tau_core.device, "host_values", host_values)
    # A CUDA generator needs the CUDA runtime; a fake run draws nothing (TempNet's dropout).
    monkeypatch.setattr(tau_core.device, "generator", lambda device: torch.Generator())
    return made


@pytest.fixture
def one_rank_group() -> Any:
    """A one-process gloo group, so that the sharded layout allocates its shard."""
    store = torch_dist.HashStore()
    torch_dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    torch_dist.destroy_process_group()


class DeviceRecorder(TorchDispatchMode):
    """Records every operation and every tensor it makes that is not on ``device``.

    Two kinds of host tensors are expected: the pinned buffer of the deferred checks (made in
    ``tau_core.device.copy_to_host``, see :func:`make_recorder`) and Python numbers lifted to 0-d
    CPU tensors (``d[rows, cols] = -1e30``), which CUDA kernels take by value, not by copy.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.ops: list[Any] = []
        self.in_host_copy = False
        self.host_copies: list[Tensor] = []
        self.off_device: list[tuple[Any, torch.device]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        self.ops.append(func)
        if self.in_host_copy:
            return out
        for t in tree_leaves(out):
            if not isinstance(t, Tensor) or t.device == self.device:
                continue
            if func is aten.lift_fresh.default and t.dim() == 0:
                continue
            self.off_device.append((func, t.device))
        return out


@pytest.fixture
def make_recorder(monkeypatch: pytest.MonkeyPatch) -> Callable[[torch.device], DeviceRecorder]:
    """Makes a :class:`DeviceRecorder` that knows the pinned host copies of the checks."""
    copy_to_host = tau_core.device.copy_to_host
    recorders: list[DeviceRecorder] = []

    def recorded_copy(values: Tensor) -> Tensor:
        for r in recorders:
            r.in_host_copy = True
        try:
            host = copy_to_host(values)
        finally:
            for r in recorders:
                r.in_host_copy = False
        for r in recorders:
            r.host_copies.append(host)
        return host

    monkeypatch.setattr(tau_core.device, "copy_to_host", recorded_copy)

    def make(device: torch.device) -> DeviceRecorder:
        recorders.append(DeviceRecorder(device))
        return recorders[-1]

    return make


def features(image_text: bool) -> tuple[Tensor, Tensor]:
    a = torch.randn(BATCH, DIM, device=CUDA, requires_grad=True)
    b = torch.randn(BATCH, DIM, device=CUDA, requires_grad=True)
    return a, b


def call(loss: Any, image_text: bool, a: Tensor, b: Tensor, index: Tensor) -> Tensor:
    if image_text:
        return loss(a, b, index=index)
    return loss(a, b, index)


def kept_tensors(loss: Any) -> dict[str, Tensor]:
    """Every tensor the loss keeps between steps: parameters, buffers, state, statistics."""
    kept = {f"param {n}": p for n, p in loss.named_parameters()}
    kept.update({f"buffer {n}": b for n, b in loss.named_buffers()})
    kept.update({f"stats {k}": v for k, v in loss._stats_values.items()})
    kept.update({f"stats {k}": v for k, v in loss._stats_temperatures.items()})
    state = getattr(loss, "state", None)
    if state is not None:
        tables = getattr(state, "_tables", None) or {"storage": state._storage}
        kept.update({f"state {k}": v for k, v in tables.items()})
    return kept


@pytest.mark.parametrize("name,layout", CASES)
def test_training_steps_stay_on_the_gpu_without_a_host_sync(
    name: str, layout: str, events: list[FakeEvent], make_recorder, request: pytest.FixtureRequest
) -> None:
    if layout == "sharded":
        request.getfixturevalue("one_rank_group")
    image_text = name in IMAGE_TEXT
    build = IMAGE_TEXT[name] if image_text else UNIMODAL[name]
    mode = FakeTensorMode()
    with mode, CUDA:  # everything made on the device (a fake parameter cannot be moved)
        loss = build(layout)
        if layout == "sharded":
            loss.state.to(CUDA)  # its shard starts on the host
        recorder = make_recorder(CUDA)
        with recorder:
            for _ in range(3):
                a, b = features(image_text)
                index = torch.randint(0, NUM_SAMPLES, (BATCH,), device=CUDA)
                value = call(loss, image_text, a, b, index)
                assert value.device == CUDA and value.shape == ()
                assert value.requires_grad
            stats = loss.stats
    assert set(recorder.ops).isdisjoint(SYNC_OPS)
    assert recorder.off_device == [], recorder.off_device
    assert stats and all(v.device == CUDA for v in stats.values()), stats
    assert {k: v.device for k, v in kept_tensors(loss).items() if v.device != CUDA} == {}
    # Deferred checks: one pinned copy and one event per step, each verdict read (it is "ready")
    # by the next step's check; the last one waits until raise_deferred_error is called.
    assert len(events) == 3 and all(e.device == CUDA for e in events)
    assert [e.queries for e in events] == [1, 1, 0]
    assert all(h.device.type == "cpu" for h in recorder.host_copies)
    assert len(recorder.host_copies) == 3 and len(loss._deferred) == 1
    if name not in STATELESS:
        assert loss.state.device == CUDA
        # The state was written at every step, on the device (never through the host).
        puts = (aten.index_put_.default, aten.index_put.default)
        assert len([op for op in recorder.ops if op in puts]) >= 3
    loss.raise_deferred_error(wait=True)
    assert loss._deferred == [] and events[-1].waited


@pytest.mark.parametrize("name", ["SogCLRLoss", "ISogCLRClipLoss"])
def test_evaluation_reads_the_state_without_writing_or_deferring(
    name: str, events: list[FakeEvent], make_recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_text = name in IMAGE_TEXT
    build = IMAGE_TEXT[name] if image_text else UNIMODAL[name]
    with FakeTensorMode(), CUDA:
        loss = build("replicated").eval()
        monkeypatch.setattr(loss.state, "write", None)  # a call would fail
        recorder = make_recorder(CUDA)
        with recorder, torch.no_grad():
            a, b = features(image_text)
            call(loss, image_text, a, b, torch.arange(BATCH, device=CUDA))
    assert recorder.off_device == [] and set(recorder.ops).isdisjoint(SYNC_OPS)
    assert len(events) == 1  # the batch's checks are still deferred, read at the next call


def test_openclip_train_loss_step_stays_on_the_gpu(events: list[FakeEvent], make_recorder) -> None:
    """One step as ``open_clip_train``'s loop makes it: indices from the loader's queue (on the
    host), ``IndexedLoss(**model_out, output_dict=True)``, the step's statistics summed."""
    options, _ = openclip_train.parse_loss_args(["--loss", "isogclr"])
    run = openclip_train.LossTraining(options)
    run.args = argparse.Namespace(
        accum_freq=1, log_every_n_steps=100, rank=0, local_rank=0, world_size=1
    )
    run.steps_per_epoch, run.step_in_epoch = 100, 1  # a step that does not log
    with FakeTensorMode(), CUDA:
        run.loss = openclip_tau.ISogCLRClipLoss(NUM_SAMPLES)
        indexed = openclip_train.IndexedLoss(run.loss, run)
        logit_scale = torch.ones((), device=CUDA, requires_grad=True)
        recorder = make_recorder(CUDA)
        for _ in range(2):
            run.on_batch(torch.randint(0, NUM_SAMPLES, (BATCH,)))  # the loader's indices
            a, b = features(True)
            with recorder:
                out = indexed(
                    image_features=a, text_features=b, logit_scale=logit_scale, output_dict=True
                )
            assert out["contrastive_loss"].device == CUDA
    # Only the loader's host indices are copied in (non_blocking); nothing else leaves the GPU.
    assert set(recorder.ops).isdisjoint(SYNC_OPS)
    assert recorder.off_device == []
    assert run.stat_sums and all(v.device == CUDA for v in run.stat_sums.values())
    assert len(events) == 2


@pytest.mark.parametrize("name", ["SogCLRLoss", "ISogCLRLoss", "TempNetLoss", "RGCLGClipLoss"])
def test_backward_of_a_deferred_step_never_syncs(name: str, make_recorder) -> None:
    """Forward and backward of a step with the accelerator's deferred checks, on fake CPU
    tensors (the autograd engine needs a real CUDA context for CUDA ones)."""
    image_text = name in IMAGE_TEXT
    build = IMAGE_TEXT[name] if image_text else UNIMODAL[name]
    with FakeTensorMode():
        loss = build("replicated")
        loss.sync_checks = False  # the accelerator's path: verdicts stay on the device
        recorder = make_recorder(torch.device("cpu"))
        with recorder:
            a = torch.randn(BATCH, DIM, requires_grad=True)
            b = torch.randn(BATCH, DIM, requires_grad=True)
            value = call(loss, image_text, a, b, torch.randint(0, NUM_SAMPLES, (BATCH,)))
            params = [p for p in loss.parameters() if p.requires_grad]
            grads = torch.autograd.grad(value, [a, b, *params])
    assert set(recorder.ops).isdisjoint(SYNC_OPS)
    assert [g.shape for g in grads] == [a.shape, b.shape, *(p.shape for p in params)]
    assert len(loss._deferred) == 1


def test_custom_backward_runs_on_the_gpu(make_recorder) -> None:
    """The surrogate's backward (``coef`` scaled in place) on fake CUDA tensors."""
    with FakeTensorMode():
        coef = torch.randn(6, 6, device=CUDA)
        ctx = SimpleNamespace(saved_tensors=(coef,), spent=False)
        recorder = make_recorder(CUDA)
        with recorder:
            grad_sim, grad_coef = _WeightedSimilaritySum.backward(ctx, torch.ones((), device=CUDA))
    assert grad_coef is None and grad_sim.device == CUDA and grad_sim.shape == (6, 6)
    assert recorder.off_device == [] and set(recorder.ops).isdisjoint(SYNC_OPS)
