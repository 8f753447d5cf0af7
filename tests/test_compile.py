"""``torch.compile`` of every loss's forward: graph breaks pinned, compiled steps equal eager ones.

The math, the state read and the state write trace into one graph. The breaks are the host
side, behind ``torch.compiler.disable``: where the batch's checks are read
(``ContrastiveLoss._read_verdict`` with checks before the step, the CPU default;
``raise_deferred_error`` for the previous batch with deferred checks, the accelerator default),
and after the state write, the counters of samples seen (``_after_write``; traced, each new
count would compile the step again); TempNet's dropout masks, drawn from the networks' own
seeded generators once per step before the roles' forwards (``_draw_masks``), so a compiled step
draws the masks of an eager one. ``torch._dynamo.explain`` counts a break once per frame it
cuts: the image-text forward nests one frame more.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_fake_cuda import IMAGE_TEXT, UNIMODAL

from tau_core.functional import weighted_similarity_sum

BATCH, DIM, NUM_SAMPLES = 8, 16, 64
LOSSES = [*UNIMODAL, *IMAGE_TEXT]
# Graph breaks that torch._dynamo.explain counts in one forward: (with a verdict read on the
# host, in the first step with deferred checks). The stateful losses break once more after the
# write; the image-text forward nests one frame more, cut at each break.
# TempNet: its networks' dropout masks (own seeded generators and call counters) are drawn on the
# host once per step, before the roles' forwards; the break is counted in each frame it cuts.
BREAKS = {
    **{name: (2, 1) for name in ("SogCLRLoss", "ISogCLRLoss", "RGCLGLoss")},
    "TempNetLoss": (3, 3),
    "DySTreSSLoss": (1, 0),
    **{name: (3, 2) for name in ("SogCLRClipLoss", "ISogCLRClipLoss", "RGCLGClipLoss")},
    "TempNetClipLoss": (4, 4),
    "DySTreSSClipLoss": (2, 0),
}
HOST_SIDE = ("_read_verdict", "raise_deferred_error", "_after_write", "_draw_masks")


def build(name: str, sync_checks: bool) -> torch.nn.Module:
    loss = (IMAGE_TEXT[name] if name in IMAGE_TEXT else UNIMODAL[name])("replicated")
    loss.sync_checks = sync_checks
    return loss


def step_fn(loss: torch.nn.Module, name: str):
    if name in IMAGE_TEXT:
        return lambda a, b, index: loss(a, b, index=index)
    return lambda a, b, index: loss(a, b, index)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(BATCH, DIM, generator=g).requires_grad_()
    b = torch.randn(BATCH, DIM, generator=g).requires_grad_()
    return a, b, torch.randperm(NUM_SAMPLES, generator=g)[:BATCH]


def explain(fn, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


@pytest.mark.parametrize("name", LOSSES)
def test_graph_breaks_are_only_the_host_reads_of_the_checks(name: str) -> None:
    # Checks before the step (CPU default): one break, at the verdict's host read.
    loss = build(name, sync_checks=True)
    result = explain(step_fn(loss, name), *batch(0))
    assert result.graph_break_count == BREAKS[name][0]
    assert result.break_reasons
    assert all(any(f in r.reason for f in HOST_SIDE) for r in result.break_reasons)
    # Deferred checks (accelerator default): the first step is one graph, state write included;
    # later steps break once, where the previous batch's verdict is read.
    loss = build(name, sync_checks=False)
    assert explain(step_fn(loss, name), *batch(0)).graph_break_count == BREAKS[name][1]
    result = explain(step_fn(loss, name), *batch(1))
    assert result.graph_break_count == BREAKS[name][0]
    assert all(any(f in r.reason for f in HOST_SIDE) for r in result.break_reasons)


@pytest.mark.parametrize("name", LOSSES)
def test_compiled_steps_equal_eager_steps(name: str) -> None:
    """Four steps (state read, written, read back), values, gradients and tables."""
    torch.manual_seed(0)
    eager = build(name, sync_checks=False)
    compiled = copy.deepcopy(eager)
    compiled_step = torch.compile(step_fn(compiled, name), backend="aot_eager", fullgraph=False)
    for seed in range(4):
        # Steps 0 and 1 compile (a verdict is pending from step 1 on); later ones reuse them.
        torch._dynamo.config.error_on_recompile = seed >= 2
        results = []
        for loss, fn in ((eager, step_fn(eager, name)), (compiled, compiled_step)):
            a, b, index = batch(seed)
            value = fn(a, b, index)
            params = [p for p in loss.parameters() if p.requires_grad]
            grads = torch.autograd.grad(value, [a, b, *params])
            results.append((value.detach(), grads))
        (v0, g0), (v1, g1) = results
        torch.testing.assert_close(v1, v0)
        for x, y in zip(g1, g0):
            torch.testing.assert_close(x, y)
    for key, table in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], table, equal_nan=True, msg=key)
    # TempNet's networks drew a dropout mask (rate 0.5) in every step, the same in both.
    draws = [m.dropout_calls for m in compiled.modules() if hasattr(m, "dropout_calls")]
    assert draws == ([4] * len(draws)) and ("TempNet" in name) == bool(draws)
    eager.raise_deferred_error(wait=True)
    compiled.raise_deferred_error(wait=True)


def test_surrogate_backward_compiles_when_its_coefficients_leave_the_graph() -> None:
    # A graph break after the surrogate makes its coefficients a graph output; AOT autograd
    # cannot partition a backward that mutates such a tensor in place (pytorch/pytorch#172956).
    def step(sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        coef = sim.detach().exp()
        return weighted_similarity_sum(sim, coef), coef

    sim = torch.randn(4, 5, requires_grad=True)
    value, coef = torch.compile(step, backend="aot_eager")(sim)
    value.backward()
    torch.testing.assert_close(value, (sim * sim.exp()).sum())
    torch.testing.assert_close(sim.grad, sim.detach().exp())
