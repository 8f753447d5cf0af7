"""The trained temperatures' own optimizer, the warning when nothing (or the wrong optimizer)
steps them, TempNet's own dropout stream, the same stats and first-argument errors for every
loss, and state written only by a call whose backward pass reaches the loss."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from lightly_tau import DySTreSSLoss, ISogCLRLoss, RGCLGLoss, SogCLRLoss, TempNetLoss
from openclip_tau import (
    DySTreSSClipLoss,
    ISogCLRClipLoss,
    RGCLGClipLoss,
    SogCLRClipLoss,
    TempNetClipLoss,
)
from tau_core.trained import UNSTEPPED_CALLS_WARNING, derive_seed
from tests._dist_utils import run_on_ranks

N, B, DIM, IN = 32, 8, 16, 10
STEPS_MESSAGE = "not stepped by their own optimizer"


def make(name: str) -> Any:
    return {
        "rgclg": lambda: RGCLGLoss(N, lr_tau=1e-2),
        "tempnet": lambda: TempNetLoss(N, dim=DIM, lr_tau=1e-2, num_prototypes=8),
    }[name]()


def batches(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(B, IN, generator=g)
        out.append(
            (x, x + 0.2 * torch.randn(B, IN, generator=g), torch.randperm(N, generator=g)[:B])
        )
    return out


def train(criterion: Any, mode: str, steps: int = 3, seed: int = 0) -> dict[str, Any]:
    """A plain loop: the model's SGD, and the temperature's own AdamW (mode 'own'), nothing
    ('none') or the model's SGD holding the loss's parameters too ('sgd')."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(IN, DIM)
    params = list(model.parameters())
    if mode == "sgd":
        params += list(criterion.parameters())
    optimizer = torch.optim.SGD(params, lr=0.06)
    tau_optimizer = criterion.optimizer() if mode == "own" else None
    grads: list[list[torch.Tensor]] = []
    for x0, x1, index in batches(steps, seed):
        loss = criterion(model(x0), model(x1), index)
        loss.backward()
        grads.append([p.grad.detach().double().clone() for p in criterion.temperature_parameters()])
        optimizer.step()
        optimizer.zero_grad()
        if tau_optimizer is not None:
            tau_optimizer.step()
            tau_optimizer.zero_grad()
    return {"grads": grads, "model": model}


def adamw_reference(
    start: list[torch.Tensor], grads: list[list[torch.Tensor]], lr: float, clamp: Any = None
) -> list[torch.Tensor]:
    """AdamW (weight decay 0, betas 0.9/0.999, eps 1e-8) step by step in float64."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    params = [p.double().clone() for p in start]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, step_grads in enumerate(grads, start=1):
        for k, g in enumerate(step_grads):
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            params[k] = params[k] - lr * m_hat / (v_hat.sqrt() + eps)
            if clamp is not None:
                params[k] = params[k].clamp(*clamp)
    return params


# ------------------------------------------------------------------ item: own optimizer


@pytest.mark.parametrize("name", ["rgclg", "tempnet"])
def test_own_optimizer_is_adamw_step_by_step_and_model_keeps_its_sgd(name):
    criterion = make(name)
    start = [p.detach().clone() for p in criterion.temperature_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right set-up does not warn
        run = train(criterion, "own", steps=3)
    clamp = None
    if name == "rgclg":
        clamp = (math.log(1 / criterion.global_temperature.tau_max), math.log(1 / 0.05))
    expected = adamw_reference(start, run["grads"], criterion.current_lr_tau(), clamp)
    for p, ref in zip(criterion.temperature_parameters(), expected):
        assert not torch.equal(p.detach().double(), start[0].double()) or p.numel() > 1
        torch.testing.assert_close(p.detach().double(), ref, rtol=1e-6, atol=1e-7)
    moved = sum(
        (p.detach() - s).abs().sum() for p, s in zip(criterion.temperature_parameters(), start)
    )
    assert moved > 0


def test_optimizer_without_arguments_holds_only_the_temperature():
    criterion = RGCLGLoss(N)
    opt = criterion.optimizer()
    assert isinstance(opt, torch.optim.AdamW)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert held == [criterion.logit_scale]
    assert opt.param_groups[0]["lr"] == 2e-4 and opt.param_groups[0]["weight_decay"] == 0.0


# ------------------------------------------------------------------ item: the warning


@pytest.mark.parametrize("name", ["rgclg", "tempnet"])
def test_never_stepped_warns_once_naming_what_to_do(name):
    criterion = make(name)
    with pytest.warns(UserWarning, match=STEPS_MESSAGE) as record:
        train(criterion, "none", steps=UNSTEPPED_CALLS_WARNING + 4)
    messages = [str(w.message) for w in record if STEPS_MESSAGE in str(w.message)]
    assert len(messages) == 1
    assert "nothing steps them" in messages[0]
    assert "TrainedTemperature()" in messages[0] and "criterion.optimizer()" in messages[0]


@pytest.mark.parametrize("name", ["rgclg", "tempnet"])
def test_stepped_by_the_models_sgd_warns(name):
    criterion = make(name)
    with pytest.warns(UserWarning, match=STEPS_MESSAGE) as record:
        train(criterion, "sgd", steps=UNSTEPPED_CALLS_WARNING)
    messages = [str(w.message) for w in record if STEPS_MESSAGE in str(w.message)]
    assert len(messages) == 1 and "changed by another optimizer" in messages[0]


def test_registered_own_group_in_an_adamw_does_not_warn_and_sgd_registration_warns():
    criterion = RGCLGLoss(N)
    model = torch.nn.Linear(IN, DIM)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = torch.optim.AdamW(
            [{"params": model.parameters()}] + criterion.param_groups(), lr=1e-3
        )
        criterion.register_optimizer(opt)
        for x0, x1, index in batches(UNSTEPPED_CALLS_WARNING + 2):
            criterion(model(x0), model(x1), index).backward()
            opt.step()
            opt.zero_grad()
    sgd = torch.optim.SGD([{"params": model.parameters()}] + criterion.param_groups(), lr=0.1)
    with pytest.warns(UserWarning, match="Adam\\(W\\)'s"):
        criterion.register_optimizer(sgd)


def test_lr_tau_zero_and_validation_calls_do_not_warn():
    criterion = RGCLGLoss(N, lr_tau=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(criterion, "none", steps=UNSTEPPED_CALLS_WARNING + 2)
        other = RGCLGLoss(N)
        model = torch.nn.Linear(IN, DIM)
        for x0, x1, index in batches(UNSTEPPED_CALLS_WARNING + 2):
            with torch.no_grad():
                other(model(x0), model(x1), index)


# ------------------------------------------------------------------ TempNet's dropout stream


def _tempnet_steps(loss: TempNetLoss, seed: int, steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        z = torch.randn(B, DIM, generator=g)
        out.append(loss.temperature_networks["sample"](torch.nn.functional.normalize(z, dim=1)))
    return out


def test_tempnet_dropout_has_its_own_stream_kept_in_the_state_dict():
    a = TempNetLoss(N, dim=DIM, num_prototypes=8, seed=3)
    first = _tempnet_steps(a, 0, 2)
    saved = a.state_dict()
    assert saved["temperature_networks.sample._extra_state"] == {"dropout_calls": 2}
    rest = _tempnet_steps(a, 1, 2)
    # Another loss loaded from the checkpoint draws the same masks, whatever the global RNG did.
    b = TempNetLoss(N, dim=DIM, num_prototypes=8, seed=3)
    b.load_state_dict(saved)
    torch.manual_seed(12345)
    torch.rand(100)
    again = _tempnet_steps(b, 1, 2)
    for x, y in zip(rest, again):
        assert torch.equal(x, y)
    # The global generator is not used; another seed draws other masks.
    c = TempNetLoss(N, dim=DIM, num_prototypes=8, seed=3)
    c.temperature_networks["sample"].load_state_dict(a.temperature_networks["sample"].state_dict())
    c.temperature_networks["sample"].dropout_calls = 0
    state = torch.get_rng_state()
    assert torch.equal(_tempnet_steps(c, 0, 1)[0], first[0])
    assert torch.equal(torch.get_rng_state(), state)
    d = TempNetLoss(N, dim=DIM, num_prototypes=8, seed=4)
    d.temperature_networks["sample"].load_state_dict(
        {**c.temperature_networks["sample"].state_dict(), "_extra_state": {"dropout_calls": 0}}
    )
    assert not torch.equal(_tempnet_steps(d, 0, 1)[0], first[0])


def test_tempnet_dropout_matches_dropout_math():
    net = TempNetLoss(N, dim=DIM, num_prototypes=8, dropout=0.5).temperature_networks["sample"]
    x = torch.rand(64, DIM) + 0.5
    out = net._dropout(x)
    kept = out != 0
    assert 0.3 < kept.float().mean() < 0.7
    torch.testing.assert_close(out[kept], 2.0 * x[kept])
    net.eval()
    assert torch.equal(net._dropout(x), x)


def test_derived_seeds_do_not_collide_as_seed_plus_epoch_would():
    seeds = {derive_seed(s, e) for s in range(20) for e in range(20)}
    assert len(seeds) == 400
    assert derive_seed(1, 0) != derive_seed(0, 1)
    assert all(0 <= s < 2**63 for s in seeds)


# ------------------------------------------------------------------ swapping by class name

LIGHTLY = {
    "sogclr": lambda: SogCLRLoss(N),
    "isogclr": lambda: ISogCLRLoss(N),
    "rgclg": lambda: RGCLGLoss(N),
    "tempnet": lambda: TempNetLoss(N, dim=DIM),
    "dystress": lambda: DySTreSSLoss(),
}
STAT_KEYS = {
    "objective",
    "tau_mean",
    "tau_std",
    "tau_min",
    "tau_p10",
    "tau_p50",
    "tau_p90",
    "tau_max",
}


@pytest.mark.parametrize("name", list(LIGHTLY))
def test_every_lightly_loss_has_the_same_temperature_stats(name):
    loss = LIGHTLY[name]()
    z0, z1 = torch.randn(B, DIM, requires_grad=True), torch.randn(B, DIM, requires_grad=True)
    loss(z0, z1, torch.arange(B)).backward()
    stats = loss.stats
    assert STAT_KEYS <= set(stats), sorted(STAT_KEYS - set(stats))
    assert stats["tau_min"] <= stats["tau_p10"] <= stats["tau_p50"] <= stats["tau_p90"]
    assert stats["tau_p90"] <= stats["tau_max"]


def test_dystress_stats_are_those_of_every_pair():
    loss = DySTreSSLoss(0.1, tau_max=0.3)
    z0 = torch.nn.functional.normalize(torch.randn(B, DIM), dim=1)
    z1 = torch.nn.functional.normalize(torch.randn(B, DIM), dim=1)
    loss(z0, z1)
    z = torch.cat([z0, z1])
    sim = (z @ z.T).double()
    off = ~torch.eye(2 * B, dtype=torch.bool)
    tau = 0.1 + 0.2 * torch.sin(math.pi * sim[off].clamp(-1, 1) / 2) ** 2
    assert loss.stats["tau_p50"].item() == pytest.approx(torch.quantile(tau, 0.5).item(), rel=1e-5)
    assert loss.stats["tau_mean"].item() == pytest.approx(tau.mean().item(), rel=1e-5)
    assert loss.stats["tau_max"].item() == pytest.approx(tau.max().item(), rel=1e-5)


@pytest.mark.parametrize("cls", [DySTreSSLoss, DySTreSSClipLoss])
def test_dystress_refuses_a_dataset_size_as_first_argument(cls):
    with pytest.raises(
        ValueError, match="first argument is a temperature, tau_min .* not num_samples"
    ):
        cls(512)


@pytest.mark.parametrize(
    "cls,keyword",
    [
        (SogCLRLoss, "temperature="),
        (SogCLRClipLoss, "temperature="),
        (ISogCLRLoss, "tau_init="),
        (ISogCLRClipLoss, "tau_init="),
        (RGCLGLoss, "tau_init="),
        (RGCLGClipLoss, "tau_init="),
    ],
)
def test_float_first_argument_suggests_a_keyword_the_loss_accepts(cls, keyword):
    with pytest.raises(ValueError) as err:
        cls(0.2)
    message = str(err.value)
    assert keyword in message
    if keyword != "temperature=":
        assert "temperature=" not in message


def test_float_first_argument_of_tempnet_suggests_no_temperature_keyword():
    for cls in (TempNetLoss, TempNetClipLoss):
        with pytest.raises(ValueError) as err:
            cls(0.2, dim=DIM)
        assert "temperature=" not in str(err.value) and "num_samples" in str(err.value)


# ------------------------------------------------------------------ state written on backward

STATEFUL = {
    "sogclr": lambda: SogCLRLoss(N, gamma=0.6),
    "isogclr": lambda: ISogCLRLoss(N),
    "rgclg": lambda: RGCLGLoss(N),
    "tempnet": lambda: TempNetLoss(N, dim=DIM, dropout=0.0),
    "sogclr_clip": lambda: SogCLRClipLoss(N),
    "isogclr_clip": lambda: ISogCLRClipLoss(N),
    "rgclg_clip": lambda: RGCLGClipLoss(N),
    "tempnet_clip": lambda: TempNetClipLoss(N, dim=DIM, dropout=0.0),
}


def _call(loss: Any, name: str, z0, z1, index):
    if name.endswith("_clip"):
        return loss(z0, z1, torch.tensor(10.0), index=index)
    return loss(z0, z1, index)


def _tables(loss: Any) -> dict[str, torch.Tensor]:
    return {n: loss.state.table(n) for n in loss.state.names}


@pytest.mark.parametrize("name", list(STATEFUL))
def test_a_forward_without_backward_writes_nothing(name):
    """A validation pass that forgot no_grad (train mode, features with grad): no write; the
    training step after it writes exactly what it writes without that pass."""
    loss, twin = STATEFUL[name](), STATEFUL[name]()
    steps = batches(3)
    for k, (x0, x1, index) in enumerate(steps):
        z0, z1 = x0[:, :8].repeat(1, 2), x1[:, :8].repeat(1, 2)
        for crit in (loss, twin):
            _call(
                crit, name, z0.clone().requires_grad_(), z1.clone().requires_grad_(), index
            ).backward()
        before = _tables(loss)
        value = _call(loss, name, z1.clone().requires_grad_(), z0.clone().requires_grad_(), index)
        assert value.requires_grad
        for n, t in _tables(loss).items():
            torch.testing.assert_close(t, before[n], rtol=0, atol=0, equal_nan=True, msg=(k, n))
        del value
    for n, t in _tables(loss).items():
        torch.testing.assert_close(t, _tables(twin)[n], rtol=0, atol=0, equal_nan=True, msg=n)


def test_forward_backward_writes_the_rows_when_backward_reaches_the_loss():
    loss = SogCLRLoss(N, gamma=1.0)
    x0, x1, index = batches(1)[0]
    z0, z1 = x0.repeat(1, 2)[:, :DIM], x1.repeat(1, 2)[:, :DIM]
    value = loss(z0.requires_grad_(), z1.requires_grad_(), index)
    assert not torch.isfinite(loss.state.table("log_u")).any()  # nothing written yet
    (2.0 * value).backward()  # any graph that reaches the loss
    assert torch.isfinite(loss.state.table("log_u")[index]).all()
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[index] = False
    assert not torch.isfinite(loss.state.table("log_u")[untouched]).any()


def _no_backward_rank(rank: int, world: int) -> dict[str, Any]:
    out = {}
    for layout in ("replicated", "sharded"):
        for write_on_backward in (True, False):
            loss = SogCLRLoss(N, gamma=0.6, gather_distributed=True, state_layout=layout)
            g = torch.Generator().manual_seed(5)
            for _ in range(3):
                z = torch.randn(2, world * B, DIM, generator=g)
                index = torch.randperm(N, generator=g)[: world * B]
                rows = slice(rank * B, (rank + 1) * B)
                z0, z1 = z[0, rows].clone().requires_grad_(), z[1, rows].clone().requires_grad_()
                loss(z0, z1, index[rows]).backward()
                if write_on_backward:  # an extra forward that is never backpropagated
                    loss(z1.detach().requires_grad_(), z0.detach().requires_grad_(), index[rows])
            out[(layout, write_on_backward)] = _tables(loss)
    return out


@pytest.mark.slow
def test_a_forward_without_backward_writes_nothing_on_two_ranks(tmp_path: Path):
    ranks = run_on_ranks(_no_backward_rank, tmp_path, world_size=2)
    for key, tables in ranks[0].items():
        for n, t in tables.items():
            assert torch.equal(t, ranks[1][key][n]), (key, n)  # identical on every rank
            assert torch.equal(t, ranks[0][(key[0], False)][n]), (key, n)  # no write
            assert torch.equal(t, ranks[0][("replicated", False)][n])  # both layouts
