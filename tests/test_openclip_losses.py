"""CPU tests of the image-text losses against NumPy references and OpenCLIP's ClipLoss."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import references as ref
import torch
from loss_checks import assert_step, assert_tables, on_device, reference_tables, tables
from open_clip import ClipLoss
from torch.nn import functional as F

from openclip_tau import DySTreSSClipLoss, ISogCLRClipLoss, SogCLRClipLoss

NUM_SAMPLES = 12
DIM = 5
# Batches of 5 pairs: first visits, revisits mixed with first visits, a duplicate (3).
STEP_INDICES = [
    [0, 1, 2, 3, 4],
    [3, 4, 6, 7, 0],
    [8, 3, 9, 3, 1],
    [1, 2, 11, 5, 6],
]
ISOGCLR_SETTINGS = {
    "free": dict(rho=0.5, tau_init=0.2, tau_min=0.05, tau_max=1.0, eta=0.05, beta=0.7, gamma=0.7),
    # Narrow bounds and a small gradient bound: clamping and clipping both act.
    "clamped": dict(
        rho=1.5, tau_init=0.2, tau_min=0.17, tau_max=0.21, eta=0.1, beta=0.9, gamma=0.6
    ),
}
GRAD_CLIP = {"free": 5.0, "clamped": 0.5}
ROLES = ref.ROLES_IMAGE_TEXT


def pairs(batch: int, seed: int, noise: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text features of matching pairs, correlated but not identical."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, DIM, generator=g)
    text = image + noise * torch.randn(batch, DIM, generator=g)
    return image, text


def run(loss, image, text, **kwargs) -> tuple[float, np.ndarray, np.ndarray]:
    """Value and feature gradients of one call, as float64 NumPy."""
    names = list(kwargs)
    loss, (image, text, *values) = on_device(loss, image, text, *kwargs.values())
    kwargs = dict(zip(names, values))
    xi = image.detach().clone().requires_grad_(True)
    xt = text.detach().clone().requires_grad_(True)
    value = loss(xi, xt, torch.tensor(1 / 0.07, device=xi.device), **kwargs)
    value.backward()
    return value.item(), xi.grad.double().cpu().numpy(), xt.grad.double().cpu().numpy()


# ---------------------------------------------------------------- NumPy references


def test_sogclr_clip_matches_reference_over_steps():
    loss = SogCLRClipLoss(NUM_SAMPLES, temperature=0.1, gamma=0.6)
    settings = ref.Settings(tau_init=0.1, gamma=0.6)
    states = ref.new_states(NUM_SAMPLES, settings, ROLES)
    for step, index in enumerate(STEP_INDICES):
        image, text = pairs(len(index), seed=step)
        got = run(loss, image, text, index=torch.tensor(index))
        want = ref.image_text_step(image.numpy(), text.numpy(), index, states, settings)
        assert_step(got, want)
        assert_tables(loss, reference_tables(states, learn_tau=False))
        assert loss.stats["objective"].item() == pytest.approx(got[0], rel=1e-6)
    # The two roles keep separate moving averages.
    assert not np.allclose(states["image"].log_u()[:5], states["text"].log_u()[:5])


@pytest.mark.parametrize("name", sorted(ISOGCLR_SETTINGS))
def test_isogclr_clip_matches_reference_over_steps(name):
    kwargs = ISOGCLR_SETTINGS[name]
    loss = ISogCLRClipLoss(NUM_SAMPLES, tau_grad_clip=GRAD_CLIP[name], **kwargs)
    settings = ref.Settings(learn_tau=True, grad_clip=GRAD_CLIP[name], **kwargs)
    states = ref.new_states(NUM_SAMPLES, settings, ROLES)
    for step, index in enumerate(STEP_INDICES):
        image, text = pairs(len(index), seed=10 + step)
        got = run(loss, image, text, index=torch.tensor(index))
        want = ref.image_text_step(image.numpy(), text.numpy(), index, states, settings)
        assert_step(got, want)
        assert_tables(loss, reference_tables(states, learn_tau=True))
        if len(set(index)) == len(index):  # with duplicates, stats cover every occurrence
            for role in ROLES:
                want_mean = states[role].tau[index].mean()
                assert loss.stats[f"tau_{role}_mean"].item() == pytest.approx(want_mean, rel=1e-5)
    np.testing.assert_allclose(loss.tau_image.numpy(), states["image"].tau, rtol=1e-5)
    np.testing.assert_allclose(loss.tau_text.numpy(), states["text"].tau, rtol=1e-5)
    assert not np.allclose(states["image"].tau, states["text"].tau)
    if name == "clamped":
        tau = np.concatenate([states[r].tau for r in ROLES])
        momentum = np.concatenate([states[r].momentum for r in ROLES])
        at_bound = np.isclose(tau, kwargs["tau_min"]) | np.isclose(tau, kwargs["tau_max"])
        assert at_bound.any() and (~at_bound).any()
        assert np.isclose(np.abs(momentum), kwargs["beta"] * GRAD_CLIP[name]).any()


def test_isogclr_clip_momentum_is_the_finite_difference_gradient_of_each_role():
    """With beta = 1 and no clipping the momentum of each role is its temperature gradient."""
    rho, tau_init, b = 2.0, 0.1, 5
    loss = ISogCLRClipLoss(
        b, rho=rho, tau_init=tau_init, tau_min=0.01, eta=0.0, beta=1.0, tau_grad_clip=1e6
    )
    image, text = pairs(b, seed=3)
    run(loss, image, text, index=torch.arange(b))
    e_img, e_txt = ref.normalize(image.numpy()), ref.normalize(text.numpy())
    eps = 1e-6
    for role, anchors, candidates in (("image", e_img, e_txt), ("text", e_txt, e_img)):
        for k in range(b):
            h = [
                anchors[k] @ candidates[z] - anchors[k] @ candidates[k] for z in range(b) if z != k
            ]
            numeric = (
                ref.robust_objective(h, tau_init + eps, rho)
                - ref.robust_objective(h, tau_init - eps, rho)
            ) / (2 * eps)
            got = loss.state.table(f"momentum_{role}")[k].item()
            assert got == pytest.approx(numeric, rel=1e-4), (role, k)


def test_cosine_gamma_schedule_follows_set_epoch():
    gamma_min, decay_epochs = 0.5, 2
    kwargs = dict(rho=0.5, tau_init=0.2, tau_min=0.05, tau_max=1.0, eta=0.05, beta=0.7)
    loss = ISogCLRClipLoss(5, gamma=gamma_min, gamma_decay_epochs=decay_epochs, **kwargs)
    settings = ref.Settings(learn_tau=True, gamma=1.0, grad_clip=5.0, **kwargs)
    states = ref.new_states(5, settings, ROLES)
    for step, epoch in enumerate([0, 0, 1, 2, 4]):
        loss.set_epoch(epoch)
        settings.gamma = (
            gamma_min + (1 - gamma_min) * 0.5 * (1 + math.cos(math.pi * epoch / decay_epochs))
            if epoch < decay_epochs
            else gamma_min
        )
        assert loss.current_gamma == pytest.approx(settings.gamma, abs=1e-12)
        image, text = pairs(5, seed=20 + step)
        got = run(loss, image, text, index=torch.arange(5))
        want = ref.image_text_step(image.numpy(), text.numpy(), range(5), states, settings)
        assert_step(got, want)
        assert_tables(loss, reference_tables(states, learn_tau=True))


# ------------------------------------------------------------------ DySTreSS


@pytest.mark.parametrize("t", [0.02, 0.3])
def test_dystress_clip_with_equal_bounds_is_open_clip_loss(t):
    image, text = pairs(6, seed=4)
    got = run(DySTreSSClipLoss(tau_min=t, tau_max=t), image, text)
    # ClipLoss expects normalised features (the model normalises); normalise inside the graph
    # so that both gradients are with respect to the same raw features.
    clip = ClipLoss()

    def clip_loss(xi, xt, scale):
        return clip(F.normalize(xi, dim=1), F.normalize(xt, dim=1), 1.0 / t)

    want = run(clip_loss, image, text)
    assert_step(got, want, rtol=1e-5)


def test_dystress_clip_matches_reference():
    image, text = pairs(6, seed=5)
    got = run(DySTreSSClipLoss(tau_min=0.05, tau_max=0.2), image, text)
    want = ref.dystress_image_text(image.numpy(), text.numpy(), 0.05, 0.2)
    assert_step(got, want)


def test_dystress_clip_warns_only_for_wide_ranges():
    with pytest.warns(UserWarning, match="tau_max / tau_min"):
        DySTreSSClipLoss(tau_min=0.01, tau_max=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DySTreSSClipLoss(tau_min=0.01, tau_max=0.04)


# ------------------------------------------- equivalences and OpenCLIP conventions


@pytest.mark.parametrize("rho", [0.0, 6.0])
def test_isogclr_clip_without_temperature_steps_is_sogclr_clip(rho):
    tau_init = 0.05
    isog = ISogCLRClipLoss(NUM_SAMPLES, rho=rho, tau_init=tau_init, eta=0.0, gamma=0.7)
    sog = SogCLRClipLoss(NUM_SAMPLES, temperature=tau_init, gamma=0.7)
    for step, index in enumerate(STEP_INDICES):
        image, text = pairs(5, seed=30 + step)
        v_i, gi_i, gt_i = run(isog, image, text, index=torch.tensor(index))
        v_s, gi_s, gt_s = run(sog, image, text, index=torch.tensor(index))
        assert v_i == pytest.approx(v_s + tau_init * rho, rel=1e-6, abs=1e-7)
        np.testing.assert_allclose(gi_i, gi_s, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(gt_i, gt_s, rtol=1e-6, atol=1e-9)
        for role in ROLES:
            torch.testing.assert_close(
                isog.state.table(f"log_u_{role}"), sog.state.table(f"log_u_{role}")
            )
    torch.testing.assert_close(isog.tau_image, torch.full((NUM_SAMPLES,), tau_init))
    torch.testing.assert_close(isog.tau_text, torch.full((NUM_SAMPLES,), tau_init))


def test_sogclr_clip_gamma_one_gradient_is_temperature_times_infonce_without_positive():
    """With gamma = 1 the surrogate's gradient is tau times that of
    mean over anchors of -s_pos / tau + log sum_{z != pos} exp(s_z / tau), both directions."""
    t = 0.1
    image, text = pairs(6, seed=6)
    got = run(
        SogCLRClipLoss(NUM_SAMPLES, temperature=t, gamma=1.0), image, text, index=torch.arange(6)
    )

    def decoupled(xi, xt, scale):
        zi, zt = F.normalize(xi, dim=1), F.normalize(xt, dim=1)
        total = 0.0
        for logits in (zi @ zt.T / t, zt @ zi.T / t):
            off = ~torch.eye(6, dtype=torch.bool)
            negatives = torch.logsumexp(logits[off].view(6, 5), dim=1)
            total = total + 0.5 * (negatives - logits.diagonal()).mean()
        return total

    want = run(decoupled, image, text)
    np.testing.assert_allclose(got[1], t * want[1], rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(got[2], t * want[2], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("cls", [SogCLRClipLoss, ISogCLRClipLoss, DySTreSSClipLoss])
def test_open_clip_conventions(cls):
    """output_dict, and the model's logit_scale / logit_bias kept in the graph with zero gradient."""
    loss = cls(NUM_SAMPLES) if cls is not DySTreSSClipLoss else cls()
    image, text = pairs(5, seed=7)
    scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    out = loss(image, text, scale.exp(), index=torch.arange(5), logit_bias=bias, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    out["contrastive_loss"].backward()
    assert scale.grad is not None and scale.grad.item() == 0.0
    assert bias.grad is not None and bias.grad.item() == 0.0
    plain = cls(NUM_SAMPLES) if cls is not DySTreSSClipLoss else cls()
    value = plain(image, text, scale.exp(), index=torch.arange(5))
    assert value.item() == pytest.approx(out["contrastive_loss"].item(), rel=1e-6)


# ------------------------------------------------------------------ stability


def _stateful_losses(tau: float):
    return [
        SogCLRClipLoss(NUM_SAMPLES, temperature=tau, gamma=0.8),
        ISogCLRClipLoss(NUM_SAMPLES, tau_init=tau, tau_min=tau, gamma=0.8),
    ]


@pytest.mark.parametrize("kind", ["sogclr", "isogclr", "dystress"])
def test_autocast_bfloat16_keeps_float32_math(kind):
    model = torch.nn.Linear(8, DIM)
    g = torch.Generator().manual_seed(8)
    xi, xt = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)

    def make():
        if kind == "dystress":
            return DySTreSSClipLoss(0.01, tau_max=0.04)
        return dict(zip(["sogclr", "isogclr"], _stateful_losses(0.01)))[kind]

    loss, twin = make(), make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image, text = model(xi), model(xt)
        assert image.dtype == torch.bfloat16
        value = loss(image, text, torch.tensor(100.0), index=torch.arange(5))
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # The loss casts to float32 first: same value and state as float32 inputs without autocast.
    same = twin(
        image.detach().float().requires_grad_(),
        text.detach().float().requires_grad_(),
        index=torch.arange(5),
    )
    same.backward()  # the state is written when the backward pass reaches the loss
    assert value.item() == pytest.approx(same.item(), rel=1e-6)
    if kind != "dystress":
        for name in loss.state.names:
            assert loss.state.table(name).dtype == torch.float32
            torch.testing.assert_close(loss.state.table(name), twin.state.table(name))


@pytest.mark.parametrize("case", ["positives_opposite", "positives_identical"])
def test_low_temperature_is_finite_and_matches_float64_reference(case):
    tau = 0.005
    g = torch.Generator().manual_seed(9)
    image = torch.randn(5, DIM, generator=g)
    if case == "positives_opposite":
        # h near +1 to +2: exp(h / 0.005) is far beyond float32's range.
        text = -image + 1e-3 * torch.randn(5, DIM, generator=g)
    else:
        # h near -1 to -2: exp(h / 0.005) underflows to 0 in float32.
        text = image.clone()
    for loss in _stateful_losses(tau):
        learn = isinstance(loss, ISogCLRClipLoss)
        settings = ref.Settings(tau_init=tau, gamma=0.8)
        if learn:
            settings = ref.Settings(
                tau_init=tau, gamma=0.8, learn_tau=True, rho=6.0, eta=0.03, beta=0.9,
                tau_min=tau, tau_max=1.0, grad_clip=5.0,
            )  # fmt: skip
        states = ref.new_states(NUM_SAMPLES, settings, ROLES)
        for index in ([0, 1, 2, 3, 4], [0, 1, 2, 6, 7]):
            got = run(loss, image, text, index=torch.tensor(index))
            assert math.isfinite(got[0]) and np.isfinite(got[1]).all() and np.isfinite(got[2]).all()
            want = ref.image_text_step(image.numpy(), text.numpy(), index, states, settings)
            assert_step(got, want, rtol=2e-3)
            # float32 cancellation in the temperature gradient at tau 0.005 (see the Lightly
            # tests): momentum within a few 1e-3, tau within eta times that.
            expected = reference_tables(states, learn)
            got_tables = tables(loss)
            assert set(got_tables) == set(expected)
            for name, want_table in expected.items():
                kind = name.rsplit("_", 1)[0]  # log_u, tau or momentum
                rtol, atol = {
                    "log_u": (5e-4 if learn else 1e-6, 1e-4),
                    "tau": (0, 0.03 * 3e-3),
                    "momentum": (0, 3e-3),
                }[kind]
                np.testing.assert_allclose(
                    got_tables[name], want_table, rtol=rtol, atol=atol, err_msg=name
                )


def test_very_similar_negatives_are_finite():
    g = torch.Generator().manual_seed(10)
    base = torch.randn(1, DIM, generator=g)
    image = base + 1e-4 * torch.randn(5, DIM, generator=g)
    text = base + 1e-4 * torch.randn(5, DIM, generator=g)
    for loss in _stateful_losses(0.005) + [DySTreSSClipLoss(0.01, tau_max=0.04)]:
        for _ in range(2):
            value, gi, gt = run(loss, image, text, index=torch.arange(5))
            assert math.isfinite(value) and np.isfinite(gi).all() and np.isfinite(gt).all()
        if not isinstance(loss, DySTreSSClipLoss):
            assert all(torch.isfinite(loss.state.table(n)[:5]).all() for n in loss.state.names)


# ------------------------------------------------------------------ bad input

B = 4


def _good():
    image, text = pairs(B, seed=12)
    return image, text, torch.tensor([0, 5, 9, 2])


def _poison(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x[1, 2] = value
    return x


BAD_FORWARD = {
    "missing_index": (lambda i, t, x: (i, t, None), "needs index="),
    "negative_index": (lambda i, t, x: (i, t, torch.tensor([0, -1, 3, 2])), r"index -1 is out of range.*\[0, 12\)"),
    "too_large_index": (lambda i, t, x: (i, t, torch.tensor([0, 12, 3, 2])), r"index 12 is out of range.*\[0, 12\)"),
    "float_index": (lambda i, t, x: (i, t, x.double()), "index must hold integers"),
    "bool_index": (lambda i, t, x: (i, t, torch.tensor([True, False, True, True])), "index must hold integers"),
    "long_index": (lambda i, t, x: (i, t, torch.arange(5)), "index has 5 entries but the batch has 4"),
    "2d_index": (lambda i, t, x: (i, t, x.view(2, 2)), "index must be 1-D"),
    "1d_image": (lambda i, t, x: (i[0], t, x), "image_features must be 2-D"),
    "3d_text": (lambda i, t, x: (i, t[None], x), "text_features must be 2-D"),
    "mismatched_dim": (lambda i, t, x: (i, t[:, :-1], x), "image_features and text_features must have the same shape"),
    "mismatched_batch": (lambda i, t, x: (i[:-1], t, x), "image_features and text_features must have the same shape"),
    "nan_image": (lambda i, t, x: (_poison(i, math.nan), t, x), "image_features contains NaN or Inf"),
    "inf_text": (lambda i, t, x: (i, _poison(t, -math.inf), x), "text_features contains NaN or Inf"),
}  # fmt: skip


def _trained(kind: str):
    loss = SogCLRClipLoss(NUM_SAMPLES) if kind == "sogclr" else ISogCLRClipLoss(NUM_SAMPLES)
    image, text = pairs(B, seed=11)
    loss(image, text, index=torch.tensor([1, 5, 7, 11]))
    return loss


@pytest.mark.parametrize("case", sorted(BAD_FORWARD))
@pytest.mark.parametrize("kind", ["sogclr", "isogclr"])
def test_bad_forward_input_raises_and_keeps_state(kind, case):
    loss = _trained(kind)
    before = {name: loss.state.table(name) for name in loss.state.names}
    make, message = BAD_FORWARD[case]
    image, text, index = make(*_good())
    with pytest.raises(ValueError, match=message):
        loss(image, text, torch.tensor(100.0), index=index)
    for name, table in before.items():
        assert torch.equal(loss.state.table(name), table), name
    image, text, index = _good()
    loss(image, text, torch.tensor(100.0), index=index)


@pytest.mark.parametrize(
    "case", ["1d_image", "3d_text", "mismatched_dim", "mismatched_batch", "nan_image", "inf_text"]
)
def test_bad_dystress_clip_input_raises(case):
    make, message = BAD_FORWARD[case]
    image, text, _ = make(*_good())
    with pytest.raises(ValueError, match=message):
        DySTreSSClipLoss()(image, text, torch.tensor(100.0))


BAD_ARGUMENTS = [
    (SogCLRClipLoss, dict(num_samples=0), "num_samples must be a positive integer"),
    (SogCLRClipLoss, dict(num_samples=2.5), "num_samples must be a positive integer"),
    (SogCLRClipLoss, dict(num_samples=10, temperature=0.0), r"temperature must lie in \(0, inf\]"),
    (SogCLRClipLoss, dict(num_samples=10, gamma=0.0), r"gamma must lie in \(0, 1\]"),
    (SogCLRClipLoss, dict(num_samples=10, gamma=2.0), r"gamma must lie in \(0, 1\]"),
    (ISogCLRClipLoss, dict(num_samples=-1), "num_samples must be a positive integer"),
    (ISogCLRClipLoss, dict(num_samples=10, tau_min=0.02, tau_max=0.01, tau_init=0.015), r"tau_min \(0.02\) must not exceed tau_max \(0.01\)"),
    (ISogCLRClipLoss, dict(num_samples=10, tau_init=0.001), r"tau_init must lie in \[0.005, 1\]"),
    (ISogCLRClipLoss, dict(num_samples=10, tau_init=1.5), r"tau_init must lie in \[0.005, 1\]"),
    (ISogCLRClipLoss, dict(num_samples=10, gamma=0.0), r"gamma must lie in \(0, 1\]"),
    (ISogCLRClipLoss, dict(num_samples=10, beta=0.0), r"beta must lie in \(0, 1\]"),
    (ISogCLRClipLoss, dict(num_samples=10, beta=1.1), r"beta must lie in \(0, 1\]"),
    (ISogCLRClipLoss, dict(num_samples=10, eta=-0.03), r"eta must lie in \[0, inf\]"),
    (ISogCLRClipLoss, dict(num_samples=10, rho=-6.0), r"rho must lie in \[0, inf\]"),
    (DySTreSSClipLoss, dict(tau_min=0.04, tau_max=0.01), r"tau_min \(0.04\) must not exceed tau_max \(0.01\)"),
    (DySTreSSClipLoss, dict(tau_min=-0.01, tau_max=0.04), r"tau_min must lie in \(0, inf\]"),
]  # fmt: skip


@pytest.mark.parametrize(
    "cls, kwargs, message", BAD_ARGUMENTS, ids=[f"{c.__name__}-{k}" for c, k, _ in BAD_ARGUMENTS]
)
def test_bad_arguments_raise(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)
