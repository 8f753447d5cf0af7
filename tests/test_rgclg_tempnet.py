"""RGCL-g (a global temperature learned by DRO) and TempNet (a temperature network), both hosts.

Against float64 references written from docs/methods.md (``references.py``): the temperature's
gradient against finite differences of the robust objective and against the per-anchor formula;
the model's gradient against SogCLR / iSogCLR at the same temperatures; the network's gradient
against a float64 chain rule; the optimizer helpers; bad input; two gloo processes against one.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import references as ref
import torch
from _dist_utils import run_on_ranks
from loss_checks import assert_step, assert_tables, reference_tables, tables
from torch import nn

from lightly_tau import RGCLGLoss, SogCLRLoss, TempNetLoss
from openclip_tau import RGCLGClipLoss, SogCLRClipLoss, TempNetClipLoss
from tau_core import TemperatureNetwork

NUM_SAMPLES = 12
DIM = 5
STEP_INDICES = [
    [0, 1, 2, 3, 4, 5],
    [3, 4, 6, 7, 0, 8],
    [8, 9, 3, 10, 11, 1],
    [1, 2, 11, 5, 6, 0],
]


def pair(batch: int, seed: int, noise: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, DIM, generator=g)
    return a, a + noise * torch.randn(batch, DIM, generator=g)


def call(loss, a, b, index, clip: bool) -> tuple[float, np.ndarray, np.ndarray]:
    x0 = a.detach().clone().requires_grad_(True)
    x1 = b.detach().clone().requires_grad_(True)
    if clip:
        value = loss(x0, x1, None, index=torch.tensor(index))
    else:
        value = loss(x0, x1, torch.tensor(index))
    value.backward()
    return value.item(), x0.grad.double().numpy(), x1.grad.double().numpy()


def roles(clip: bool) -> tuple[str, ...]:
    return ref.ROLES_IMAGE_TEXT if clip else ref.ROLES_UNIMODAL


# ---------------------------------------------------------------- RGCL-g


@pytest.mark.parametrize("clip", [False, True])
def test_rgclg_temperature_gradient_matches_finite_differences(clip):
    """First visit (u = the batch estimate): the returned value is the robust objective F(tau)
    and d/dlogit_scale is -tau * dF/dtau, with dF/dtau from central differences in float64."""
    rho, tau = 0.7, 0.15
    cls = RGCLGClipLoss if clip else RGCLGLoss
    loss = cls(NUM_SAMPLES, rho=rho, tau_init=tau, tau_min=0.01, gamma=0.5, gamma_decay_epochs=None)
    a, b = pair(6, seed=3)
    value, _, _ = call(loss, a, b, list(range(6)), clip)
    objective = ref.rgclg_objective_image_text if clip else ref.rgclg_objective_unimodal
    an, bn = a.numpy(), b.numpy()
    assert value == pytest.approx(objective(an, bn, tau, rho), rel=1e-5)
    eps = 1e-5
    fd = (objective(an, bn, tau + eps, rho) - objective(an, bn, tau - eps, rho)) / (2 * eps)
    grad_logit_scale = loss.logit_scale.grad.item()
    assert abs(fd) > 1e-2, "the check needs a temperature gradient away from 0"
    assert -grad_logit_scale / tau == pytest.approx(fd, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("clip", [False, True])
def test_rgclg_matches_sogclr_at_the_current_temperature_over_steps(clip):
    """Each step: value, feature gradients and tables are SogCLR's at the current temperature
    (value plus tau * rho), and the temperature gradient is the mean of the anchors' grad_tau
    (moving averages of revisited samples included); AdamW moves the temperature in between."""
    rho, gamma = 0.5, 0.6
    cls = RGCLGClipLoss if clip else RGCLGLoss
    loss = cls(
        NUM_SAMPLES,
        rho=rho,
        tau_init=0.2,
        tau_min=0.02,
        lr_tau=0.05,
        gamma=gamma,
        gamma_decay_epochs=None,
    )
    anchor = nn.Parameter(torch.zeros(1))  # the "model" of the optimizer
    optimizer = loss.optimizer([anchor], lr=0.0)
    settings = ref.Settings(tau_init=0.2, gamma=gamma, rho=rho)
    states = ref.new_states(NUM_SAMPLES, settings, roles(clip))
    taus = []
    for step, index in enumerate(STEP_INDICES):
        tau = loss.temperature
        taus.append(tau)
        settings.tau_init = tau
        a, b = pair(len(index), seed=20 + step)
        an, bn = a.numpy(), b.numpy()
        if clip:
            grads = ref.image_text_grad_tau(an, bn, index, states, settings)
            dF = 0.5 * (grads["image"].mean() + grads["text"].mean())
        else:
            dF = ref.unimodal_grad_tau(an, bn, index, states, settings).mean()
        optimizer.zero_grad()
        got = call(loss, a, b, index, clip)
        step_fn = ref.image_text_step if clip else ref.unimodal_step
        want = step_fn(an, bn, index, states, settings)
        assert_step(got, want)
        assert_tables(loss, reference_tables(states, learn_tau=False))
        assert loss.logit_scale.grad.item() == pytest.approx(-tau * dF, rel=1e-4, abs=1e-7)
        assert loss.stats["tau_mean"].item() == pytest.approx(tau, rel=1e-6)
        optimizer.step()
    assert max(taus) - min(taus) > 0.02, "the temperature should have moved"


@pytest.mark.parametrize("clip", [False, True])
def test_rgclg_with_zero_step_size_is_sogclr(clip):
    rho, tau, gamma = 0.5, 0.2, 0.6
    if clip:
        loss = RGCLGClipLoss(
            NUM_SAMPLES, rho=rho, tau_init=tau, lr_tau=0.0, gamma=gamma, gamma_decay_epochs=None
        )
        base = SogCLRClipLoss(NUM_SAMPLES, temperature=tau, gamma=gamma)
    else:
        loss = RGCLGLoss(NUM_SAMPLES, rho=rho, tau_init=tau, lr_tau=0.0, gamma=gamma)
        base = SogCLRLoss(NUM_SAMPLES, temperature=tau, gamma=gamma)
    optimizer = loss.optimizer([nn.Parameter(torch.zeros(1))], lr=0.1)
    for step, index in enumerate(STEP_INDICES):
        a, b = pair(len(index), seed=40 + step)
        optimizer.zero_grad()
        value, g0, g1 = call(loss, a, b, index, clip)
        base_value, b0, b1 = call(base, a, b, index, clip)
        optimizer.step()
        # tau = exp(-log(1 / 0.2)) in float32 is 0.2 to within one rounding step.
        assert value == pytest.approx(base_value + tau * rho, rel=1e-5, abs=1e-7)
        # tau differs from 0.2 by one float32 rounding step: gradients agree to ~1e-7.
        np.testing.assert_allclose(g0, b0, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(g1, b1, rtol=1e-5, atol=1e-7)
        for name, table in tables(base).items():
            np.testing.assert_allclose(tables(loss)[name], table, rtol=1e-6, atol=1e-6)
    assert loss.temperature == pytest.approx(tau, rel=1e-7)


def test_rgclg_clip_defaults_are_fastclips_cc3m_setting():
    loss = RGCLGClipLoss(100)
    assert loss.temperature == pytest.approx(0.07)
    assert loss.rho == 6.5 and loss.lr_tau == 2e-4 and loss.gamma == 0.2
    assert loss.gamma_decay_epochs == 18
    assert loss.global_temperature.tau_min == 0.01 and loss.global_temperature.tau_max == 1.0
    assert loss.current_gamma == 1.0  # epoch 0
    assert loss.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_rgclg_optimizer_groups_schedule_and_clamp():
    loss = RGCLGClipLoss(20, tau_init=0.05, tau_min=0.03, tau_max=0.5, lr_tau=2.0)
    model = nn.Linear(3, 2)
    groups = loss.param_groups()
    assert len(groups) == 1 and groups[0]["params"] == [loss.logit_scale]
    assert groups[0]["weight_decay"] == 0.0 and groups[0]["lr"] == 2.0
    optimizer = torch.optim.AdamW(
        [{"params": model.parameters()}] + groups, lr=1e-3, weight_decay=0.1
    )
    loss.register_optimizer(optimizer)
    # A large step towards smaller tau: the step leaves the range, the hook clamps it back.
    loss.logit_scale.grad = torch.tensor(-1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert loss.logit_scale.item() == pytest.approx(math.log(1 / 0.03), rel=1e-6)
    assert loss.temperature == pytest.approx(0.03)
    # At tau <= 0.03 the next step runs at lr_tau / 3 (FastCLIP's step_thresh), whatever a
    # scheduler of the model's groups set.
    for group in optimizer.param_groups:
        group["lr"] = 123.0
    expected = loss.current_lr_tau()
    loss.logit_scale.grad = torch.tensor(1.0)
    optimizer.step()
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(expected)
    assert optimizer.param_groups[0]["lr"] == 123.0
    assert optimizer.param_groups[0]["lr"] == 123.0
    # A resumed run loads the optimizer's state after registering: new group dicts, same hooks.
    optimizer.load_state_dict(optimizer.state_dict())
    for group in optimizer.param_groups:
        group["lr"] = 123.0
    expected = loss.current_lr_tau()
    loss.logit_scale.grad = torch.tensor(1.0)
    optimizer.step()
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(expected)
    assert optimizer.param_groups[0]["lr"] == 123.0
    # Clamped at the start of a forward too, without any optimizer.
    with torch.no_grad():
        loss.logit_scale.fill_(10.0)
    a, b = pair(4, seed=1)
    loss(a.requires_grad_(), b, index=torch.arange(4))
    assert loss.stats["tau_mean"].item() == pytest.approx(0.03, rel=1e-6)


def test_optimizer_helper_keeps_the_loss_parameters_in_their_own_group():
    """A LightningModule's parameters() include the loss's: the helper must not step them twice
    or with the model's weight decay."""

    class Module(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Linear(3, 2)
            self.criterion = TempNetLoss(10, dim=2)

    module = Module()
    optimizer = module.criterion.optimizer(module.parameters(), lr=1e-3, weight_decay=0.05)
    assert len(optimizer.param_groups) == 2
    model_group, net_group = optimizer.param_groups
    assert {id(p) for p in model_group["params"]} == {id(p) for p in module.backbone.parameters()}
    assert {id(p) for p in net_group["params"]} == {
        id(p) for p in module.criterion.temperature_parameters()
    }
    assert net_group["weight_decay"] == 0.0 and net_group["lr"] == pytest.approx(3e-5)
    assert model_group["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="own group"):
        mixed = torch.optim.AdamW(module.parameters())
        module.criterion.register_optimizer(mixed)


# ---------------------------------------------------------------- TempNet


def network_params(net: TemperatureNetwork) -> dict[str, np.ndarray]:
    return {n: p.detach().double().numpy() for n, p in net.named_parameters()}


def test_temperature_network_matches_its_equations():
    net = TemperatureNetwork(7, tau_min=0.005, tau_max=0.05, num_prototypes=16).eval()
    z = torch.nn.functional.normalize(torch.randn(9, 7, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        net.head.weight.normal_(generator=torch.Generator().manual_seed(3))  # not only the init
    got = net(z).detach().double().numpy()
    want = ref.tempnet_forward(z.numpy(), network_params(net), 0.005, 0.05)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got.min() >= 0.005 and got.max() <= 0.05 and np.ptp(got) > 1e-4
    # The same seed builds the same network (every rank), another seed another one.
    again = TemperatureNetwork(7, tau_min=0.005, tau_max=0.05, num_prototypes=16)
    other = TemperatureNetwork(7, tau_min=0.005, tau_max=0.05, num_prototypes=16, seed=1)
    assert torch.equal(again.prototypes, net.prototypes)
    assert torch.equal(again.proj.weight, net.proj.weight)
    assert not torch.equal(other.prototypes, net.prototypes)
    # Dropout acts in training mode only.
    net.train()
    assert not torch.allclose(net(z), net(z))


def make_tempnet(clip: bool, **kwargs: Any):
    cls = TempNetClipLoss if clip else TempNetLoss
    return cls(NUM_SAMPLES, dim=DIM, num_prototypes=8, **kwargs)


@pytest.mark.parametrize("clip", [False, True])
def test_tempnet_with_a_constant_network_is_isogclr_at_that_temperature(clip):
    rho, gamma, t = 0.6, 0.7, 0.3
    loss = make_tempnet(clip, rho=rho, gamma=gamma, tau_min=0.05, tau_max=0.5)
    with torch.no_grad():
        for net in loss.temperature_networks.values():
            net.head.weight.zero_()
            net.head.bias.fill_(t)
    c = 0.05 + 0.45 / (1 + math.exp(-t))
    settings = ref.Settings(tau_init=c, gamma=gamma, rho=rho)
    states = ref.new_states(NUM_SAMPLES, settings, roles(clip))
    for step, index in enumerate(STEP_INDICES):
        a, b = pair(len(index), seed=60 + step)
        got = call(loss, a, b, index, clip)
        step_fn = ref.image_text_step if clip else ref.unimodal_step
        assert_step(got, step_fn(a.numpy(), b.numpy(), index, states, settings))
        want_tables = reference_tables(states, learn_tau=False)
        for suffix in ("_image", "_text") if clip else ("",):
            tau_table = np.full(NUM_SAMPLES, np.nan)
            tau_table[np.isfinite(want_tables["log_u" + suffix])] = c
            want_tables["tau" + suffix] = tau_table
        assert_tables(loss, want_tables)


def _reference_network_gradients(
    loss, a: np.ndarray, b: np.ndarray, index: list[int], states: dict, clip: bool, rho: float
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, np.ndarray]]:
    """The network's parameter gradients by the chain rule in float64: each anchor's temperature
    from a float64 copy of its network, ``grad_tau_i`` from the NumPy reference at those
    temperatures, and autograd through ``mean_i tau_i * grad_tau_i`` (roles averaged)."""
    nets64 = {
        role: copy.deepcopy(net).double().eval() for role, net in loss.temperature_networks.items()
    }
    settings = ref.Settings(tau_init=0.0, gamma=loss.current_gamma, learn_tau=True, rho=rho)
    work = copy.deepcopy(states)
    a64, b64 = torch.from_numpy(ref.normalize(a)), torch.from_numpy(ref.normalize(b))
    if clip:
        taus = {"image": nets64["image"](a64), "text": nets64["text"](b64)}
        for role in ("image", "text"):
            work[role].tau[index] = taus[role].detach().numpy()
        grads = ref.image_text_grad_tau(a, b, index, work, settings)
        term = sum((taus[r] * torch.from_numpy(grads[r])).mean() / 2 for r in ("image", "text"))
        predicted = {r: taus[r].detach().numpy() for r in ("image", "text")}
    else:
        net = nets64["sample"]
        tau_sample = (net(a64) + net(b64)) / 2
        work["sample"].tau[index] = tau_sample.detach().numpy()
        rows = torch.from_numpy(ref.unimodal_grad_tau(a, b, index, work, settings))
        term = (tau_sample.repeat(2) * rows).mean()
        predicted = {"sample": tau_sample.detach().numpy()}
    term.backward()
    out = {role: {n: p.grad for n, p in nets64[role].named_parameters()} for role in nets64}
    return out, predicted


@pytest.mark.parametrize("clip", [False, True])
def test_tempnet_gradients_match_the_float64_chain_rule_over_steps(clip):
    """Model gradient = iSogCLR's at the predicted temperatures; network gradient = the anchors'
    grad_tau pushed through the network; the networks move between steps (Adam)."""
    rho, gamma = 0.6, 0.7
    loss = make_tempnet(clip, rho=rho, gamma=gamma, tau_min=0.05, tau_max=0.5, dropout=0.0)
    optimizer = torch.optim.Adam(loss.param_groups(), lr=0.05)
    states = ref.new_states(NUM_SAMPLES, ref.Settings(tau_init=0.0, gamma=gamma), roles(clip))
    start = {n: p.detach().clone() for n, p in loss.named_parameters()}
    for step, index in enumerate(STEP_INDICES):
        a, b = pair(len(index), seed=80 + step)
        an, bn = a.numpy(), b.numpy()
        want_grads, predicted = _reference_network_gradients(loss, an, bn, index, states, clip, rho)
        optimizer.zero_grad()
        got = call(loss, a, b, index, clip)
        # The model's side: iSogCLR's step at the predicted temperatures (eta 0: tau held).
        settings = ref.Settings(tau_init=0.0, gamma=gamma, learn_tau=True, rho=rho, eta=0.0)
        for role, tau in predicted.items():
            states[role].tau[index] = tau
        step_fn = ref.image_text_step if clip else ref.unimodal_step
        assert_step(got, step_fn(an, bn, index, states, settings), rtol=2e-4)
        for role, net in loss.temperature_networks.items():
            # One scale per network: the softmax at scale exp(log(0.01)) is nearly saturated,
            # so log_scale's own gradient is float32 noise (about 1e-10).
            scale = max(np.abs(g.numpy()).max() for g in want_grads[role].values())
            assert scale > 1e-4
            for name, p in net.named_parameters():
                np.testing.assert_allclose(
                    p.grad.double().numpy(),
                    want_grads[role][name].numpy(),
                    rtol=1e-3,
                    atol=1e-4 * scale,
                    err_msg=f"{role} {name} step {step}",
                )
        optimizer.step()
    moved = [n for n, p in loss.named_parameters() if not torch.equal(p, start[n])]
    assert len(moved) == len(start)


def test_tempnet_clip_defaults_and_temperature_of_held_out_embeddings():
    loss = TempNetClipLoss(50, dim=16)
    assert loss.rho == 7.0 and loss.gamma == 0.8 and loss.lr_tau == 3e-5
    nets = loss.temperature_networks
    assert set(nets) == {"image", "text"}
    assert nets["image"].tau_min == 0.005 and nets["image"].tau_max == 0.05
    assert nets["image"].num_prototypes == 256 and nets["image"].dropout == 0.5
    assert not torch.equal(nets["image"].prototypes, nets["text"].prototypes)
    held_out = torch.randn(7, 16, generator=torch.Generator().manual_seed(5))
    tau = loss.temperature_of(held_out, role="text")
    assert tau.shape == (7,)
    assert loss.training  # the loss stays in training mode
    want = ref.tempnet_forward(
        ref.normalize(held_out.numpy()), network_params(nets["text"]), 0.005, 0.05
    )
    np.testing.assert_allclose(tau.double().numpy(), want, rtol=1e-5)
    with pytest.raises(ValueError, match="role"):
        loss.temperature_of(held_out, role="audio")
    # The published Adam schedule: 3e-5 * 0.9 ** epoch.
    optimizer = loss.optimizer([nn.Parameter(torch.zeros(2))], lr=1e-3)
    loss.set_epoch(3)
    optimizer.step()
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(3e-5 * 0.9**3)
    assert optimizer.param_groups[-1]["betas"] == (0.9, 0.999)
    rgclg = RGCLGClipLoss(50)
    np.testing.assert_allclose(rgclg.temperature_of(held_out).numpy(), 0.07, rtol=1e-6)


# ---------------------------------------------------------------- state, bad input


@pytest.mark.parametrize("kind", ["rgclg", "tempnet", "rgclg_clip", "tempnet_clip"])
def test_state_dict_round_trip_and_bad_input_change_nothing(kind):
    clip = kind.endswith("clip")
    build = {
        "rgclg": lambda: RGCLGLoss(NUM_SAMPLES, lr_tau=0.1),
        "tempnet": lambda: make_tempnet(False, dropout=0.0),
        "rgclg_clip": lambda: RGCLGClipLoss(NUM_SAMPLES, lr_tau=0.1),
        "tempnet_clip": lambda: make_tempnet(True, dropout=0.0),
    }[kind]
    loss = build()
    optimizer = loss.optimizer([nn.Parameter(torch.zeros(1))], lr=0.1)
    for step, index in enumerate(STEP_INDICES[:2]):
        a, b = pair(len(index), seed=100 + step)
        optimizer.zero_grad()
        call(loss, a, b, index, clip)
        optimizer.step()
    saved = copy.deepcopy(loss.state_dict())
    assert any(k.startswith(("global_temperature.", "temperature_networks.")) for k in saved)
    fresh = build()
    fresh.load_state_dict(saved)
    a, b = pair(6, seed=7)
    index = STEP_INDICES[2]
    assert call(fresh, a, b, index, clip)[0] == pytest.approx(call(loss, a, b, index, clip)[0])

    before = copy.deepcopy(loss.state_dict())
    bad_a = a.clone()
    bad_a[1, 2] = float("nan")
    name = "image_features" if clip else "out0"
    with pytest.raises(ValueError, match=f"{name} contains NaN"):
        call(loss, bad_a, b, index, clip)
    with pytest.raises(ValueError, match="out of range"):
        call(loss, a, b, [0, 1, 2, 3, 4, NUM_SAMPLES], clip)
    with pytest.raises(ValueError, match="needs index"):
        loss(a.requires_grad_(), b, index=None)
    after = loss.state_dict()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), key


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (RGCLGLoss, dict(tau_init=2.0), r"tau_init must lie in \[0.05, 1\]"),
        (RGCLGLoss, dict(tau_min=0.0), r"tau_min must lie in \(0, inf\]"),
        (RGCLGLoss, dict(rho=-1.0), "rho must lie in"),
        (RGCLGLoss, dict(lr_tau=-1e-4), "lr_tau must lie in"),
        (RGCLGClipLoss, dict(lr_tau_drop_factor=0.0), "lr_tau_drop_factor must lie in"),
        (RGCLGClipLoss, dict(lr_tau_drop_below=-0.1), "lr_tau_drop_below must lie in"),
        (RGCLGClipLoss, dict(gamma=0.0), "gamma must lie in"),
        (TempNetLoss, dict(dim=None), "needs dim="),
        (TempNetLoss, dict(dim=0), "dim must be an integer >= 1"),
        (TempNetLoss, dict(dim=4, dropout=1.0), r"dropout must lie in \[0, 1\)"),
        (TempNetLoss, dict(dim=4, num_prototypes=0), "num_prototypes must be"),
        (TempNetClipLoss, dict(dim=4, lr_tau_decay=1.5), r"lr_tau_decay must lie in \(0, 1\]"),
        (TempNetClipLoss, dict(dim=4, tau_min=0.1, tau_max=0.05), "must not exceed tau_max"),
    ],
)
def test_out_of_range_settings_name_the_argument(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(10, **kwargs)


# ---------------------------------------------------------------- two processes

DIST_SAMPLES, DIST_LOCAL = 16, 4
DIST_CASES = ("rgclg", "tempnet", "rgclg_clip", "tempnet_clip")


def _dist_loss(case: str, rank: int, world_size: int):
    clip_kwargs = {"rank": rank, "world_size": world_size}
    if case == "rgclg":
        return RGCLGLoss(
            DIST_SAMPLES, rho=0.5, tau_init=0.2, lr_tau=0.05, gamma=0.7, gather_distributed=True
        )
    if case == "tempnet":
        return TempNetLoss(
            DIST_SAMPLES,
            dim=DIM,
            rho=0.5,
            num_prototypes=8,
            dropout=0.0,
            lr_tau=0.05,
            gamma=0.7,
            gather_distributed=True,
        )
    if case == "rgclg_clip":
        return RGCLGClipLoss(
            DIST_SAMPLES,
            rho=1.0,
            tau_init=0.1,
            lr_tau=0.05,
            gamma=0.7,
            gamma_decay_epochs=None,
            **clip_kwargs,
        )
    return TempNetClipLoss(
        DIST_SAMPLES,
        dim=DIM,
        rho=1.0,
        num_prototypes=8,
        dropout=0.0,
        lr_tau=0.05,
        gamma=0.7,
        **clip_kwargs,
    )


def _dist_case(case: str, rank: int, world_size: int) -> dict[str, Any]:
    """Three steps of a linear model (in DDP when distributed) and the loss (not in DDP), with
    the helper's AdamW; each rank feeds its slice of the same global batches."""
    torch.manual_seed(0)
    model = nn.Linear(DIM, DIM)
    forward = model
    if world_size > 1:
        forward = torch.nn.parallel.DistributedDataParallel(model)
    loss_fn = _dist_loss(case, rank, world_size)
    optimizer = loss_fn.optimizer(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(5)
    record: dict[str, Any] = {"temperature_grad": [], "loss": []}
    for _ in range(3):
        global_index = torch.randperm(DIST_SAMPLES, generator=g)[: DIST_LOCAL * 2]
        x0 = torch.randn(DIST_LOCAL * 2, DIM, generator=g)
        x1 = torch.randn(DIST_LOCAL * 2, DIM, generator=g)
        rows = slice(
            rank * len(global_index) // world_size, (rank + 1) * len(global_index) // world_size
        )
        z0, z1 = forward(x0[rows]), forward(x1[rows])
        if case.endswith("clip"):
            value = loss_fn(z0, z1, None, index=global_index[rows])
        else:
            value = loss_fn(z0, z1, global_index[rows])
        optimizer.zero_grad()
        value.backward()
        record["loss"].append(value.item())
        record["temperature_grad"].append(
            [p.grad.clone() for p in loss_fn.temperature_parameters()]
        )
        optimizer.step()
    record["parameters"] = {n: p.detach().clone() for n, p in loss_fn.named_parameters()}
    record["model"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    record["state"] = {n: loss_fn.state.table(n) for n in loss_fn.state.names}
    return record


def _dist_all(rank: int, world_size: int) -> dict[str, Any]:
    return {case: _dist_case(case, rank, world_size) for case in DIST_CASES}


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_on_ranks(_dist_all, tmp_path_factory.mktemp("ranks"))


@pytest.mark.slow
@pytest.mark.parametrize("case", DIST_CASES)
def test_two_ranks_train_the_temperature_as_one_process(case, dist_results):
    """The loss is outside DDP (as in OpenCLIP's loop): its temperature gradients are still the
    global batch's on both ranks, so both ranks hold the single process's temperature."""
    single = _dist_case(case, 0, 1)
    ranks = [r[case] for r in dist_results]
    for step in range(3):
        mean_loss = sum(r["loss"][step] for r in ranks) / 2
        assert mean_loss == pytest.approx(single["loss"][step], rel=1e-5, abs=1e-6)
        for k, want in enumerate(single["temperature_grad"][step]):
            for r in ranks:
                torch.testing.assert_close(
                    r["temperature_grad"][step][k], want, rtol=1e-4, atol=1e-7
                )
    for name, value in single["parameters"].items():
        assert torch.equal(ranks[0]["parameters"][name], ranks[1]["parameters"][name]), name
        torch.testing.assert_close(ranks[0]["parameters"][name], value, rtol=1e-4, atol=1e-6)
    for name, value in single["model"].items():
        torch.testing.assert_close(ranks[0]["model"][name], value, rtol=1e-4, atol=1e-6)
    for name, table in single["state"].items():
        torch.testing.assert_close(ranks[0]["state"][name], ranks[1]["state"][name], equal_nan=True)
        torch.testing.assert_close(
            ranks[0]["state"][name], table, rtol=1e-4, atol=1e-5, equal_nan=True
        )
