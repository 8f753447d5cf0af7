"""CPU tests of the Lightly losses against NumPy references and Lightly's own losses."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import references as ref
import torch
from lightly.loss import DCLLoss, NTXentLoss
from loss_checks import assert_step, assert_tables, on_device, reference_tables, tables

from lightly_tau import DySTreSSLoss, ISogCLRLoss, SogCLRLoss, dystress_temperature
from tau_core import functional, global_contrastive_rows
from tau_core.adapter import DYSTRESS_MONOTONE_RATIO, DYSTRESS_RANKING_RATIO

NUM_SAMPLES = 12
DIM = 5
# Batches of 6 over 12 samples: first visits, revisits mixed with first visits, a duplicate (3).
STEP_INDICES = [
    [0, 1, 2, 3, 4, 5],
    [3, 4, 6, 7, 0, 8],
    [8, 9, 3, 3, 10, 1],
    [1, 2, 11, 5, 6, 0],
]

ISOGCLR_SETTINGS = {
    # Temperatures move freely inside their bounds.
    "free": dict(rho=0.3, tau_init=0.2, tau_min=0.05, tau_max=1.0, eta=0.05, beta=0.5, gamma=0.7),
    # Narrow bounds, a large step and a small gradient bound: clamping and clipping both act.
    "clamped": dict(
        rho=1.5, tau_init=0.2, tau_min=0.17, tau_max=0.21, eta=0.1, beta=0.9, gamma=0.6
    ),
}
GRAD_CLIP = {"free": 3.0, "clamped": 0.5}


def views(batch: int, seed: int, noise: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """Two correlated views: the positive is usually, not always, the most similar."""
    g = torch.Generator().manual_seed(seed)
    out0 = torch.randn(batch, DIM, generator=g)
    out1 = out0 + noise * torch.randn(batch, DIM, generator=g)
    return out0, out1


def run(loss, out0, out1, *args) -> tuple[float, np.ndarray, np.ndarray]:
    """Value and input gradients of one call, as float64 NumPy."""
    loss, (out0, out1, *args) = on_device(loss, out0, out1, *args)
    x0 = out0.detach().clone().requires_grad_(True)
    x1 = out1.detach().clone().requires_grad_(True)
    value = loss(x0, x1, *args)
    value.backward()
    return value.item(), x0.grad.double().cpu().numpy(), x1.grad.double().cpu().numpy()


# ---------------------------------------------------------------- NumPy references


def test_sogclr_matches_reference_over_steps():
    loss = SogCLRLoss(NUM_SAMPLES, temperature=0.2, gamma=0.6)
    settings = ref.Settings(tau_init=0.2, gamma=0.6)
    states = ref.new_states(NUM_SAMPLES, settings, ref.ROLES_UNIMODAL)
    for step, index in enumerate(STEP_INDICES):
        out0, out1 = views(len(index), seed=step)
        got = run(loss, out0, out1, torch.tensor(index))
        want = ref.unimodal_step(out0.numpy(), out1.numpy(), index, states, settings)
        assert_step(got, want)
        assert_tables(loss, reference_tables(states, learn_tau=False))
        assert loss.stats["objective"].item() == pytest.approx(got[0], rel=1e-6)


@pytest.mark.parametrize("name", sorted(ISOGCLR_SETTINGS))
def test_isogclr_matches_reference_over_steps(name):
    kwargs = ISOGCLR_SETTINGS[name]
    loss = ISogCLRLoss(NUM_SAMPLES, tau_grad_clip=GRAD_CLIP[name], **kwargs)
    settings = ref.Settings(learn_tau=True, grad_clip=GRAD_CLIP[name], **kwargs)
    states = ref.new_states(NUM_SAMPLES, settings, ref.ROLES_UNIMODAL)
    for step, index in enumerate(STEP_INDICES):
        out0, out1 = views(len(index), seed=10 + step)
        got = run(loss, out0, out1, torch.tensor(index))
        want = ref.unimodal_step(out0.numpy(), out1.numpy(), index, states, settings)
        assert_step(got, want)
        assert_tables(loss, reference_tables(states, learn_tau=True))
        if len(set(index)) == len(index):  # with duplicates, stats cover every occurrence
            batch_tau = states["sample"].tau[index]
            assert loss.stats["tau_mean"].item() == pytest.approx(batch_tau.mean(), rel=1e-5)
    np.testing.assert_allclose(loss.tau.numpy(), states["sample"].tau, rtol=1e-5)
    tau, momentum = states["sample"].tau, states["sample"].momentum
    assert np.ptp(tau) > 1e-3, "the temperatures should have moved apart"
    if name == "clamped":
        # The settings are meant to exercise the bounds: check that they did.
        at_bound = np.isclose(tau, kwargs["tau_min"]) | np.isclose(tau, kwargs["tau_max"])
        assert at_bound.any() and (~at_bound).any()
        clip = kwargs["beta"] * GRAD_CLIP[name]
        assert np.isclose(np.abs(momentum), clip).any()


def test_first_visit_uses_gamma_one_and_revisit_mixes():
    """u after a revisit is (1 - gamma) * u_old + gamma * (the batch estimate alone)."""
    gamma = 0.3
    loss = SogCLRLoss(NUM_SAMPLES, temperature=0.2, gamma=gamma)
    index = torch.arange(6)
    first, second = views(6, seed=1), views(6, seed=2)
    run(loss, *first, index)
    # A first visit ignores gamma: same state as gamma = 1.
    batch_only = SogCLRLoss(NUM_SAMPLES, temperature=0.2, gamma=1.0)
    run(batch_only, *first, index)
    assert torch.equal(loss.state.table("log_u"), batch_only.state.table("log_u"))
    u_old = loss.state.table("log_u")[:6].double().exp()

    run(loss, *second, index)
    fresh = SogCLRLoss(NUM_SAMPLES, temperature=0.2, gamma=gamma)
    run(fresh, *second, index)
    g_new = fresh.state.table("log_u")[:6].double().exp()
    u_new = loss.state.table("log_u")[:6].double().exp()
    torch.testing.assert_close(u_new, (1 - gamma) * u_old + gamma * g_new, rtol=1e-5, atol=0)
    assert not torch.allclose(u_new, g_new, rtol=1e-3)


def test_cosine_gamma_schedule_follows_set_epoch():
    gamma_min, decay_epochs = 0.4, 3
    loss = SogCLRLoss(6, temperature=0.2, gamma=gamma_min, gamma_decay_epochs=decay_epochs)
    settings = ref.Settings(tau_init=0.2, gamma=1.0)
    states = ref.new_states(6, settings, ref.ROLES_UNIMODAL)
    index = list(range(6))
    schedule = [0, 0, 1, 2, 3, 5]  # two steps in epoch 0: a revisit at gamma 1
    for step, epoch in enumerate(schedule):
        loss.set_epoch(epoch)
        expected_gamma = (
            gamma_min + (1 - gamma_min) * 0.5 * (1 + math.cos(math.pi * epoch / decay_epochs))
            if epoch < decay_epochs
            else gamma_min
        )
        assert loss.current_gamma == pytest.approx(expected_gamma, abs=1e-12)
        settings.gamma = expected_gamma
        out0, out1 = views(6, seed=20 + step)
        got = run(loss, out0, out1, torch.tensor(index))
        want = ref.unimodal_step(out0.numpy(), out1.numpy(), index, states, settings)
        assert_step(got, want)
        assert_tables(loss, reference_tables(states, learn_tau=False))
    assert loss.current_gamma == gamma_min
    with pytest.raises(ValueError, match="epoch"):
        loss.set_epoch(-1)


def test_constant_gamma_ignores_epoch():
    loss = SogCLRLoss(6, gamma=0.7)
    loss.set_epoch(0)
    assert loss.current_gamma == 0.7


# ------------------------------------------------------- temperature gradient


def test_temperature_gradient_closed_form_matches_finite_differences():
    """grad_tau = log(u) + rho - mean_z w h / tau, with gamma = 1, is dF/dtau in float64."""
    rows, cols, rho = 5, 9, 0.4
    g = torch.Generator().manual_seed(3)
    sim = torch.rand(rows, cols, generator=g, dtype=torch.float64) * 2 - 1
    pos_col = torch.tensor([1, 2, 3, 4, 0])
    self_col = torch.tensor([5, 6, 7, 8, 5])
    tau = torch.tensor([0.05, 0.1, 0.2, 0.5, 1.0], dtype=torch.float64)
    log_u = torch.full((rows,), -math.inf, dtype=torch.float64)
    result = global_contrastive_rows(sim, pos_col, self_col, tau, log_u, gamma=1.0, rho=rho)
    for r in range(rows):
        negatives = [c for c in range(cols) if c not in (int(pos_col[r]), int(self_col[r]))]
        h = [(sim[r, c] - sim[r, pos_col[r]]).item() for c in negatives]
        t, eps = tau[r].item(), 1e-6 * tau[r].item()
        numeric = (
            ref.robust_objective(h, t + eps, rho) - ref.robust_objective(h, t - eps, rho)
        ) / (2 * eps)
        assert result.grad_tau[r].item() == pytest.approx(numeric, rel=1e-7, abs=1e-8)
        assert result.objective[r].item() == pytest.approx(
            ref.robust_objective(h, t, rho), rel=1e-12
        )


def test_row_slabs_give_the_whole_block_result(monkeypatch):
    """On a CPU the rows are processed a slab at a time; slab edges must not change anything."""
    rows, cols = 13, 15
    g = torch.Generator().manual_seed(5)
    sim = torch.rand(rows, cols, generator=g) * 2 - 1
    pos_col = torch.randint(0, cols, (rows,), generator=g)
    self_col = (pos_col + 1) % cols
    tau = torch.rand(rows, generator=g) * 0.5 + 0.01
    log_u = torch.randn(rows, generator=g)
    log_u[::4] = -math.inf  # some first visits
    args = (sim, pos_col, self_col, tau, log_u)
    whole = global_contrastive_rows(*args, gamma=0.7, rho=0.3)
    monkeypatch.setattr(functional, "_CPU_SLAB_ELEMENTS", 2 * cols)  # slabs of 2 rows, 1 left
    slabs = global_contrastive_rows(*args, gamma=0.7, rho=0.3)
    for name in ("coef", "log_u", "grad_tau", "objective"):
        torch.testing.assert_close(getattr(slabs, name), getattr(whole, name), rtol=0, atol=0)


def test_dystress_row_slabs_give_the_whole_block_result(monkeypatch):
    rows, cols = 11, 14
    g = torch.Generator().manual_seed(8)
    sim = torch.rand(rows, cols, generator=g) * 2 - 1
    pos_col = torch.randint(0, cols, (rows,), generator=g)
    self_col = (pos_col + 3) % cols
    whole = functional.dystress_rows(sim, pos_col, self_col, 0.07, 0.2)
    monkeypatch.setattr(functional, "_CPU_SLAB_ELEMENTS", 3 * cols)  # slabs of 3 rows, 2 left
    slabs = functional.dystress_rows(sim, pos_col, self_col, 0.07, 0.2)
    for name in ("coef", "loss", "tau_positive", "tau_negative_sum"):
        torch.testing.assert_close(getattr(slabs, name), getattr(whole, name), rtol=0, atol=0)
    assert (whole.coef[torch.arange(rows), self_col] == 0).all()


def test_second_backward_through_a_stateful_loss_raises():
    """The surrogate's coefficients become the gradient in place: reuse must fail, not mislead."""
    loss = SogCLRLoss(4)
    out0, out1 = views(4, seed=6)
    out0.requires_grad_()
    value = loss(out0, out1, torch.arange(4))
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        value.backward()


def test_isogclr_momentum_is_the_mean_finite_difference_gradient_of_both_views():
    """With beta = 1 and no clipping the momentum state is the temperature gradient itself."""
    rho, tau_init, b = 0.5, 0.15, 4
    loss = ISogCLRLoss(
        b, rho=rho, tau_init=tau_init, eta=0.0, beta=1.0, gamma=0.5, tau_grad_clip=1e6
    )
    out0, out1 = views(b, seed=4)
    run(loss, out0, out1, torch.arange(b))
    e = ref.normalize(np.concatenate([out0.numpy(), out1.numpy()]))
    eps = 1e-6
    for k in range(b):
        grads = []
        for view in (0, 1):
            a, p = view * b + k, (1 - view) * b + k
            h = [e[a] @ e[z] - e[a] @ e[p] for z in range(2 * b) if z not in (a, p)]
            grads.append(
                (
                    ref.robust_objective(h, tau_init + eps, rho)
                    - ref.robust_objective(h, tau_init - eps, rho)
                )
                / (2 * eps)
            )
        assert loss.state.table("momentum")[k].item() == pytest.approx(np.mean(grads), rel=1e-4)


# ------------------------------------------------------------------ DySTreSS


def test_dystress_with_equal_bounds_is_ntxent():
    out0, out1 = views(7, seed=5)
    for t in (0.1, 0.5):
        got = run(DySTreSSLoss(tau_min=t, tau_max=t), out0, out1)
        want = run(NTXentLoss(temperature=t), out0, out1)
        assert_step(got, want, rtol=1e-5)


def test_dystress_matches_reference():
    out0, out1 = views(6, seed=6)
    got = run(DySTreSSLoss(tau_min=0.1, tau_max=0.3), out0, out1)
    want = ref.dystress_unimodal(out0.numpy(), out1.numpy(), 0.1, 0.3)
    assert_step(got, want)
    # The range matters: NT-Xent at either bound gives another value.
    for t in (0.1, 0.3):
        assert abs(run(NTXentLoss(temperature=t), out0, out1)[0] - got[0]) > 1e-3


def test_dystress_temperature_values():
    tau_min, tau_max = 0.1, 0.3
    s = torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0])
    got = dystress_temperature(s, tau_min, tau_max)
    want = [ref.dystress_tau(v, tau_min, tau_max) for v in s.tolist()]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))
    assert got[0] == pytest.approx(tau_max) and got[-1] == pytest.approx(tau_max)
    assert got[2] == pytest.approx(tau_min)
    assert got[1] == pytest.approx(got[4].item())  # symmetric in s
    # U shape: decreasing on [-1, 0], increasing on [0, 1].
    grid = torch.linspace(-1, 1, 201)
    curve = dystress_temperature(grid, tau_min, tau_max)
    assert (curve[:101].diff() <= 0).all() and (curve[100:].diff() >= 0).all()
    # Similarities beyond +-1 (half-precision dot products) are clamped, not folded back.
    beyond = dystress_temperature(torch.tensor([-1.5, 1.2, 3.0]), tau_min, tau_max)
    torch.testing.assert_close(beyond, torch.full((3,), tau_max))
    # Detached: the temperature is not trained through.
    assert not dystress_temperature(grid.requires_grad_(), tau_min, tau_max).requires_grad


def _effective_logit(s: np.ndarray, ratio: float) -> np.ndarray:
    return s / np.array([ref.dystress_tau(v, 1.0, ratio) for v in s])


def test_dystress_warning_threshold_is_where_monotonicity_breaks():
    s = np.linspace(-1.0, 1.0, 4001)
    assert (np.diff(_effective_logit(s, 4.0)) > 0).all()
    assert not (np.diff(_effective_logit(s, 5.0)) > 0).all()
    # Bisection on the ratio: the monotone limit is the package's threshold (about 4.5).
    low, high = 4.0, 5.0
    for _ in range(30):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if (np.diff(_effective_logit(s, mid)) > 0).all() else (low, mid)
    assert abs(low - DYSTRESS_MONOTONE_RATIO) < 0.1
    # Above the ranking limit some negative (s < 1) outranks a perfect positive (s = 1).
    for ratio, outranked in (
        (DYSTRESS_RANKING_RATIO - 0.2, False),
        (DYSTRESS_RANKING_RATIO + 0.2, True),
    ):
        curve = _effective_logit(s, ratio)
        assert (curve[:-1].max() > curve[-1]) == outranked
        if outranked:
            assert abs(s[np.argmax(curve)] - 0.23) < 0.03


def test_dystress_warns_only_for_wide_ranges():
    with pytest.warns(UserWarning, match="tau_max / tau_min"):
        DySTreSSLoss(tau_min=0.1, tau_max=0.5)
    with pytest.warns(UserWarning, match="outranks a perfect positive"):
        DySTreSSLoss(tau_min=0.05, tau_max=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DySTreSSLoss(tau_min=0.1, tau_max=0.4)
        DySTreSSLoss(tau_min=0.07, tau_max=0.2)
        DySTreSSLoss(tau_min=0.2, tau_max=0.2)


# --------------------------------------------------- agreement with Lightly


@pytest.mark.parametrize("temperature", [0.1, 0.3])
def test_sogclr_gamma_one_gradient_is_temperature_times_dcl(temperature):
    loss = SogCLRLoss(NUM_SAMPLES, temperature=temperature, gamma=1.0)
    dcl = DCLLoss(temperature=temperature)
    for step, index in enumerate(STEP_INDICES[:2]):  # the second step revisits samples
        out0, out1 = views(6, seed=30 + step)
        _, g0, g1 = run(loss, out0, out1, torch.tensor(index))
        _, d0, d1 = run(dcl, out0, out1)
        np.testing.assert_allclose(g0, temperature * d0, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(g1, temperature * d1, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("rho", [0.0, 0.4])
def test_isogclr_without_temperature_steps_is_sogclr(rho):
    tau_init = 0.15
    isog = ISogCLRLoss(NUM_SAMPLES, rho=rho, tau_init=tau_init, eta=0.0, gamma=0.6)
    sog = SogCLRLoss(NUM_SAMPLES, temperature=tau_init, gamma=0.6)
    for step, index in enumerate(STEP_INDICES):
        out0, out1 = views(6, seed=40 + step)
        v_i, g0_i, g1_i = run(isog, out0, out1, torch.tensor(index))
        v_s, g0_s, g1_s = run(sog, out0, out1, torch.tensor(index))
        assert v_i == pytest.approx(v_s + tau_init * rho, rel=1e-6, abs=1e-7)
        np.testing.assert_allclose(g0_i, g0_s, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(g1_i, g1_s, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(isog.state.table("log_u"), sog.state.table("log_u"))
    torch.testing.assert_close(isog.tau, torch.full((NUM_SAMPLES,), tau_init))


# ------------------------------------------------------------------ stability


def _stateful_losses(tau: float):
    return [
        SogCLRLoss(NUM_SAMPLES, temperature=tau, gamma=0.8),
        ISogCLRLoss(NUM_SAMPLES, tau_init=tau, tau_min=tau, eta=0.03, gamma=0.8),
    ]


@pytest.mark.parametrize("kind", ["sogclr", "isogclr", "dystress"])
def test_autocast_bfloat16_keeps_float32_math(kind):
    model = torch.nn.Linear(8, DIM)
    g = torch.Generator().manual_seed(7)
    x0, x1 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    if kind == "dystress":
        loss, args = DySTreSSLoss(0.1, tau_max=0.2), ()
    else:
        loss = dict(zip(["sogclr", "isogclr"], _stateful_losses(0.1)))[kind]
        args = (torch.arange(6),)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out0, out1 = model(x0), model(x1)
        assert out0.dtype == torch.bfloat16
        value = loss(out0, out1, *args)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    if kind != "dystress":
        for name in loss.state.names:
            assert loss.state.table(name).dtype == torch.float32
            assert torch.isfinite(loss.state.table(name)[:6]).all()
        # The loss casts to float32 before any math: same value as float32 inputs outside autocast.
        twin = type(loss)(NUM_SAMPLES, **_twin_kwargs(loss))
        same = twin(
            out0.detach().float().requires_grad_(), out1.detach().float().requires_grad_(), *args
        )
        same.backward()  # the state is written when the backward pass reaches the loss
        assert value.item() == pytest.approx(same.item(), rel=1e-6)
        for name in loss.state.names:
            torch.testing.assert_close(loss.state.table(name), twin.state.table(name))


def _twin_kwargs(loss) -> dict:
    if isinstance(loss, ISogCLRLoss):
        s = loss.settings
        return dict(rho=s.rho, tau_init=s.tau_init, tau_min=s.tau_min, eta=s.eta, gamma=loss.gamma)
    return dict(temperature=loss.temperature, gamma=loss.gamma)


def _separated_views(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(8)
    out0 = torch.randn(6, DIM, generator=g)
    if case == "positives_opposite":
        # h = s_neg - s_pos near +1 to +2: exp(h / 0.005) is far beyond float32's range.
        return out0, -out0 + 1e-3 * torch.randn(6, DIM, generator=g)
    # Positives identical, negatives far: exp(h / 0.005) underflows to 0 in float32.
    return out0, out0.clone()


@pytest.mark.parametrize("case", ["positives_opposite", "positives_identical"])
def test_low_temperature_is_finite_and_matches_float64_reference(case):
    tau = 0.005
    out0, out1 = _separated_views(case)
    e = ref.normalize(np.concatenate([out0.numpy(), out1.numpy()]))
    sims = e @ e.T
    h_span = np.abs(sims).max() * 2
    assert h_span / tau > 200  # exp would leave float32 without the log-space state
    for loss in _stateful_losses(tau):
        learn = isinstance(loss, ISogCLRLoss)
        settings = ref.Settings(tau_init=tau, gamma=0.8)
        if learn:
            settings = ref.Settings(
                tau_init=tau, gamma=0.8, learn_tau=True, rho=0.3, eta=0.03, beta=0.5,
                tau_min=tau, tau_max=1.0, grad_clip=3.0,
            )  # fmt: skip
        states = ref.new_states(NUM_SAMPLES, settings, ref.ROLES_UNIMODAL)
        for index in ([0, 1, 2, 3, 4, 5], [0, 1, 2, 6, 7, 8]):
            got = run(loss, out0, out1, torch.tensor(index))
            assert math.isfinite(got[0])
            assert np.isfinite(got[1]).all() and np.isfinite(got[2]).all()
            want = ref.unimodal_step(out0.numpy(), out1.numpy(), index, states, settings)
            assert_step(got, want, rtol=2e-3)
            # At tau 0.005, log(u) and mean(w * h / tau) are both near 400 and the temperature
            # gradient is their difference (about -2): float32 leaves it about 1e-3 off, so the
            # momentum is within a few 1e-3, tau within eta times that, and log(u) at the next
            # step inherits the error of tau.
            expected = reference_tables(states, learn)
            got_tables = tables(loss)
            assert set(got_tables) == set(expected)
            rtol = {"log_u": 5e-4 if learn else 1e-6, "tau": 0, "momentum": 0}
            atol = {"log_u": 1e-4, "tau": 0.03 * 3e-3, "momentum": 3e-3}
            for name, want in expected.items():
                np.testing.assert_allclose(
                    got_tables[name], want, rtol=rtol[name], atol=atol[name], err_msg=name
                )


def test_very_similar_negatives_are_finite():
    g = torch.Generator().manual_seed(9)
    base = torch.randn(1, DIM, generator=g)
    out0 = base + 1e-4 * torch.randn(6, DIM, generator=g)
    out1 = base + 1e-4 * torch.randn(6, DIM, generator=g)
    losses = _stateful_losses(0.005) + [DySTreSSLoss(0.1, tau_max=0.2)]
    for loss in losses:
        args = () if isinstance(loss, DySTreSSLoss) else (torch.arange(6),)
        for _ in range(2):
            value, g0, g1 = run(loss, out0, out1, *args)
            assert math.isfinite(value) and np.isfinite(g0).all() and np.isfinite(g1).all()
        if not isinstance(loss, DySTreSSLoss):
            assert all(torch.isfinite(t[:6]).all() for t in map(loss.state.table, loss.state.names))


# ------------------------------------------------------------------ bad input

B = 4


def _trained(kind: str):
    loss = (
        SogCLRLoss(NUM_SAMPLES, gamma=0.8)
        if kind == "sogclr"
        else ISogCLRLoss(NUM_SAMPLES, eta=0.1)
    )
    out0, out1 = views(B, seed=11)
    loss(out0, out1, torch.tensor([1, 5, 7, 11]))
    return loss


def _good():
    out0, out1 = views(B, seed=12)
    return out0, out1, torch.tensor([0, 5, 9, 2])


BAD_FORWARD = {
    "negative_index": (lambda o0, o1, i: (o0, o1, torch.tensor([0, -1, 3, 2])), r"index -1 is out of range.*\[0, 12\)"),
    "too_large_index": (lambda o0, o1, i: (o0, o1, torch.tensor([0, 12, 3, 2])), r"index 12 is out of range.*\[0, 12\)"),
    "float_index": (lambda o0, o1, i: (o0, o1, i.float()), "index must hold integers"),
    "float_list_index": (lambda o0, o1, i: (o0, o1, [0.0, 1.0, 2.0, 3.0]), "index must hold integers"),
    "bool_index": (lambda o0, o1, i: (o0, o1, torch.tensor([True, False, True, True])), "index must hold integers"),
    "short_index": (lambda o0, o1, i: (o0, o1, i[:3]), "index has 3 entries but the batch has 4"),
    "2d_index": (lambda o0, o1, i: (o0, o1, i.view(2, 2)), "index must be 1-D"),
    "1d_out0": (lambda o0, o1, i: (o0[0], o1, i), "out0 must be 2-D"),
    "3d_out1": (lambda o0, o1, i: (o0, o1[None], i), "out1 must be 2-D"),
    "mismatched_dim": (lambda o0, o1, i: (o0, o1[:, :-1], i), "out0 and out1 must have the same shape"),
    "mismatched_batch": (lambda o0, o1, i: (o0, o1[:-1], i), "out0 and out1 must have the same shape"),
    "nan_out0": (lambda o0, o1, i: (_poison(o0, math.nan), o1, i), "out0 contains NaN or Inf"),
    "inf_out1": (lambda o0, o1, i: (o0, _poison(o1, math.inf), i), "out1 contains NaN or Inf"),
}  # fmt: skip


def _poison(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x[1, 2] = value
    return x


@pytest.mark.parametrize("case", sorted(BAD_FORWARD))
@pytest.mark.parametrize("kind", ["sogclr", "isogclr"])
def test_bad_forward_input_raises_and_keeps_state(kind, case):
    loss = _trained(kind)
    before = {name: loss.state.table(name) for name in loss.state.names}
    make, message = BAD_FORWARD[case]
    with pytest.raises(ValueError, match=message):
        loss(*make(*_good()))
    for name, table in before.items():
        assert torch.equal(loss.state.table(name), table), name
    # The loss still works after the error.
    loss(*_good())


@pytest.mark.parametrize(
    "case", ["1d_out0", "3d_out1", "mismatched_dim", "mismatched_batch", "nan_out0", "inf_out1"]
)
def test_bad_dystress_input_raises(case):
    make, message = BAD_FORWARD[case]
    out0, out1, _ = make(*_good())
    with pytest.raises(ValueError, match=message):
        DySTreSSLoss()(out0, out1)


BAD_ARGUMENTS = [
    (SogCLRLoss, dict(num_samples=0), "num_samples must be a positive integer"),
    (SogCLRLoss, dict(num_samples=-3), "num_samples must be a positive integer"),
    (SogCLRLoss, dict(num_samples=10.0), "num_samples must be a positive integer"),
    (SogCLRLoss, dict(num_samples=True), "num_samples must be a positive integer"),
    (SogCLRLoss, dict(num_samples="10"), "num_samples must be a positive integer"),
    (SogCLRLoss, dict(num_samples=10, temperature=0.0), r"temperature must lie in \(0, inf\]"),
    (SogCLRLoss, dict(num_samples=10, temperature=-0.1), r"temperature must lie in \(0, inf\]"),
    (SogCLRLoss, dict(num_samples=10, temperature=math.nan), r"temperature must lie in \(0, inf\]"),
    (SogCLRLoss, dict(num_samples=10, gamma=0.0), r"gamma must lie in \(0, 1\]"),
    (SogCLRLoss, dict(num_samples=10, gamma=1.5), r"gamma must lie in \(0, 1\]"),
    (SogCLRLoss, dict(num_samples=10, gamma_decay_epochs=0), "gamma_decay_epochs must be None or an integer >= 1"),
    (ISogCLRLoss, dict(num_samples=0), "num_samples must be a positive integer"),
    (ISogCLRLoss, dict(num_samples=10, tau_min=0.3, tau_max=0.2, tau_init=0.25), r"tau_min \(0.3\) must not exceed tau_max \(0.2\)"),
    (ISogCLRLoss, dict(num_samples=10, tau_min=0.0), r"tau_min must lie in \(0, inf\]"),
    (ISogCLRLoss, dict(num_samples=10, tau_init=0.01), r"tau_init must lie in \[0.05, 1\]"),
    (ISogCLRLoss, dict(num_samples=10, tau_init=2.0), r"tau_init must lie in \[0.05, 1\]"),
    (ISogCLRLoss, dict(num_samples=10, gamma=0.0), r"gamma must lie in \(0, 1\]"),
    (ISogCLRLoss, dict(num_samples=10, gamma=1.01), r"gamma must lie in \(0, 1\]"),
    (ISogCLRLoss, dict(num_samples=10, beta=0.0), r"beta must lie in \(0, 1\]"),
    (ISogCLRLoss, dict(num_samples=10, beta=1.5), r"beta must lie in \(0, 1\]"),
    (ISogCLRLoss, dict(num_samples=10, eta=-0.01), r"eta must lie in \[0, inf\]"),
    (ISogCLRLoss, dict(num_samples=10, rho=-0.1), r"rho must lie in \[0, inf\]"),
    (ISogCLRLoss, dict(num_samples=10, tau_grad_clip=0.0), r"tau_grad_clip must lie in \(0, inf\]"),
    (DySTreSSLoss, dict(tau_min=0.3, tau_max=0.2), r"tau_min \(0.3\) must not exceed tau_max \(0.2\)"),
    (DySTreSSLoss, dict(tau_min=0.0, tau_max=0.2), r"tau_min must lie in \(0, inf\]"),
    (DySTreSSLoss, dict(tau_min=0.1, tau_max=-1.0), r"tau_max must lie in \(0, inf\]"),
]  # fmt: skip


@pytest.mark.parametrize(
    "cls, kwargs, message", BAD_ARGUMENTS, ids=[f"{c.__name__}-{k}" for c, k, _ in BAD_ARGUMENTS]
)
def test_bad_arguments_raise(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)
