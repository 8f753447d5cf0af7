"""The public API of every loss: interchangeable calls, keyword arguments, when state is written,
warnings for likely mistakes, checks deferred on accelerators, and a core free of the hosts."""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightly.loss import NTXentLoss

from lightly_tau import DySTreSSLoss, ISogCLRLoss, SogCLRLoss
from openclip_tau import DySTreSSClipLoss, ISogCLRClipLoss, SogCLRClipLoss

REPO_ROOT = Path(__file__).resolve().parents[1]
N, B, DIM = 40, 8, 6

LIGHTLY = {
    "sogclr": lambda: SogCLRLoss(N),
    "isogclr": lambda: ISogCLRLoss(N, eta=0.1),
    "dystress": lambda: DySTreSSLoss(),
}
OPENCLIP = {
    "sogclr": lambda: SogCLRClipLoss(N, temperature=0.1),
    "isogclr": lambda: ISogCLRClipLoss(N, tau_init=0.1, rho=0.5),
    "dystress": lambda: DySTreSSClipLoss(),
}
STATEFUL = ("sogclr", "isogclr")


def features(seed: int = 0, grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(B, DIM, generator=g), torch.randn(B, DIM, generator=g)
    return a.requires_grad_(grad), b.requires_grad_(grad)


def call(loss, host: str, z0, z1, index=None, backward: bool = True):
    """One call of the loss, backpropagated (as a training step is) when it has a gradient."""
    if host == "lightly":
        value = loss(z0, z1, index)
    else:
        value = loss(z0, z1, torch.tensor(10.0), index=index)
    if backward and value.requires_grad:
        value.backward()
    return value


def tables(loss) -> dict[str, torch.Tensor]:
    state = getattr(loss, "state", None)
    return {} if state is None else {name: state.table(name) for name in state.names}


def assert_same_tables(before, after):
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


HOSTS = [("lightly", LIGHTLY), ("openclip", OPENCLIP)]
ALL = [(host, name) for host, registry in HOSTS for name in registry]


def build(host: str, name: str):
    return dict(HOSTS)[host][name]()


# ------------------------------------------------------------------ interchangeable


@pytest.mark.parametrize("host,name", ALL)
def test_every_loss_has_the_same_interface(host, name):
    loss = build(host, name)
    z0, z1 = features()
    index = torch.arange(B)
    loss.set_epoch(3)
    assert loss.epoch == 3
    value = call(loss, host, z0, z1, index)  # backpropagated
    stats = loss.stats
    # The same temperature statistics for every loss (DySTreSS: those of every pair).
    assert {"objective", "tau_mean", "tau_std", "tau_min", "tau_max"} <= stats.keys()
    assert {"tau_p10", "tau_p50", "tau_p90"} <= stats.keys()
    assert stats["objective"].item() == pytest.approx(value.item(), rel=1e-6)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    if name in STATEFUL:
        assert {"tau_p10", "tau_p50", "tau_p90", "surrogate"} <= stats.keys()
        taus = [loss.tau] if host == "lightly" else [loss.tau_image, loss.tau_text]
        assert all(t.shape == (N,) for t in taus)
    # Constructor settings after the first are keyword-only.
    params = list(inspect.signature(type(loss).__init__).parameters.values())[1:]
    assert all(p.kind == p.KEYWORD_ONLY for p in params[1:])


@pytest.mark.parametrize("host", ["lightly", "openclip"])
def test_stateless_loss_ignores_the_index(host):
    loss = build(host, "dystress")
    z0, z1 = features()
    with_index = call(loss, host, z0, z1, torch.arange(B))
    without = call(loss, host, z0, z1)
    assert with_index.item() == without.item()


@pytest.mark.parametrize("host,name", [(h, n) for h, n in ALL if n in STATEFUL])
def test_stateful_loss_without_index_is_a_clear_error(host, name):
    loss = build(host, name)
    z0, z1 = features()
    with pytest.raises(ValueError, match="needs index="):
        call(loss, host, z0, z1)
    assert_same_tables(tables(build(host, name)), tables(loss))


def test_misplaced_positional_arguments_are_refused_with_a_message():
    with pytest.raises(ValueError, match="first argument of SogCLRLoss is num_samples"):
        SogCLRLoss(0.2)
    with pytest.raises(ValueError, match="needs num_samples="):
        ISogCLRClipLoss(num_samples=None)
    with pytest.raises(TypeError, match="num_samples"):
        ISogCLRClipLoss()  # a required argument
    with pytest.raises(TypeError):
        SogCLRLoss(N, 0.2)  # keyword-only: temperature=0.2
    with pytest.raises(TypeError):
        ISogCLRClipLoss(N, 6.0)


def test_clip_losses_take_clip_loss_distributed_arguments():
    for local_loss, gather_with_grad in [(False, False), (False, True), (True, True)]:
        loss = SogCLRClipLoss(N, local_loss=local_loss, gather_with_grad=gather_with_grad)
        assert (loss.local_loss, loss.gather_with_grad) == (local_loss, gather_with_grad)
    for cls, args in [(SogCLRClipLoss, (N,)), (ISogCLRClipLoss, (N,)), (DySTreSSClipLoss, ())]:
        with pytest.raises(ValueError, match="gather_with_grad=False would drop"):
            cls(*args, local_loss=True, gather_with_grad=False)
    with pytest.raises(ValueError, match="local_loss must be True or False"):
        SogCLRClipLoss(N, local_loss="yes")
    with pytest.raises(ValueError, match=r"rank must lie in \[0, world_size\)"):
        DySTreSSClipLoss(rank=2, world_size=2)
    # world_size > 1 without a process group: an error at the first call, not a silent local loss.
    loss = SogCLRClipLoss(N, world_size=2)
    z0, z1 = features()
    with pytest.raises(ValueError, match="world_size=2 but the default process group has 1"):
        loss(z0, z1, index=torch.arange(B))


def test_drop_in_for_ntxent_in_a_training_loop():
    """The swap is one line plus the index; the loop is otherwise NT-Xent's."""
    torch.manual_seed(0)
    data = torch.randn(N, 12)
    for criterion in (NTXentLoss(), SogCLRLoss(N), ISogCLRLoss(N), DySTreSSLoss()):
        model = torch.nn.Linear(12, DIM)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for epoch in range(2):
            if hasattr(criterion, "set_epoch"):
                criterion.set_epoch(epoch)
            for start in range(0, N, B):
                index = torch.arange(start, start + B)
                x = data[index]
                z0, z1 = model(x + 0.1 * torch.randn_like(x)), model(x + 0.1 * torch.randn_like(x))
                args = () if isinstance(criterion, NTXentLoss) else (index,)
                loss = criterion(z0, z1, *args)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                assert torch.isfinite(loss)


# ------------------------------------------------------------------ when state is written


@pytest.mark.parametrize("host,name", [(h, n) for h, n in ALL if n in STATEFUL])
def test_validation_passes_read_but_never_write(host, name):
    loss = build(host, name)
    z0, z1 = features()
    index = torch.arange(B)
    call(loss, host, z0, z1, index)  # a training step writes
    trained = tables(loss)
    assert torch.isfinite(trained[next(iter(trained))][:B]).all()

    z0v, z1v = features(seed=1)
    with torch.no_grad():  # the usual validation loop: no_grad, train mode left on
        value_no_grad = call(loss, host, z0v, z1v, index)
    assert_same_tables(trained, tables(loss))
    loss.eval()  # eval mode, gradients on
    value_eval = call(loss, host, z0v, z1v, index)
    assert_same_tables(trained, tables(loss))
    # Features that do not require grad (detached model outputs) read only too.
    loss.train()
    call(loss, host, z0v.detach(), z1v.detach(), index)
    assert_same_tables(trained, tables(loss))
    # Reading gives the value of the stored state: the same in both validation modes.
    assert value_no_grad.item() == pytest.approx(value_eval.item(), rel=1e-6)
    # And a training step still writes.
    call(loss, host, z0v, z1v, index)
    changed = tables(loss)
    assert any(not torch.equal(trained[k], changed[k]) for k in trained)


# ------------------------------------------------------------------ likely mistakes


def test_labels_passed_as_index_warn_once():
    loss = ISogCLRLoss(10_000)
    labels = torch.arange(B) % 4
    with pytest.warns(UserWarning, match="not its class label"):
        for step in range(3):
            call(loss, "lightly", *features(step), labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(loss, "lightly", *features(5), labels)  # once only


def test_dataset_indices_do_not_warn():
    loss = SogCLRLoss(N)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in range(3):
            loss.set_epoch(epoch)
            for start in range(0, N, B):
                call(loss, "lightly", *features(start), torch.arange(start, start + B))


def test_gamma_schedule_without_set_epoch_warns_after_two_epochs():
    loss = SogCLRClipLoss(16, gamma=0.2, gamma_decay_epochs=4)
    index = torch.arange(B)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(4):  # two epochs of 16 samples: not yet
            call(loss, "openclip", *features(step), index + (step % 2) * B)
    with pytest.warns(UserWarning, match="set_epoch was never called"):
        call(loss, "openclip", *features(9), index)
    # With set_epoch no warning, and gamma follows the schedule.
    loss = SogCLRClipLoss(16, gamma=0.2, gamma_decay_epochs=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for epoch in range(4):
            loss.set_epoch(epoch)
            for half in range(2):
                call(loss, "openclip", *features(epoch), index + half * B)
    assert loss.current_gamma == pytest.approx(
        0.2 + 0.8 * 0.5 * (1 + torch.cos(torch.tensor(3 * torch.pi / 4)).item())
    )


# ------------------------------------------------------------------ deferred checks


@pytest.mark.parametrize("host,name", [(h, n) for h, n in ALL if n in STATEFUL])
def test_deferred_checks_never_let_a_bad_batch_change_the_state(host, name):
    """On an accelerator the value checks are read one call later (no host sync per step);
    a bad batch must still leave the state as it was. Forced here on the CPU."""
    loss = build(host, name)
    loss.sync_checks = False
    call(loss, host, *features(0), torch.arange(B))
    loss.raise_deferred_error(wait=True)
    before = tables(loss)
    z0, z1 = features(1)
    z0 = z0.detach().clone()
    z0[2, 1] = float("nan")
    call(loss, host, z0.requires_grad_(), z1, torch.arange(B))  # no error yet
    assert_same_tables(before, tables(loss))
    with pytest.raises(ValueError, match="previous batch's .* NaN"):
        call(loss, host, *features(2), torch.arange(B))
    assert_same_tables(before, tables(loss))
    # An index out of range: never read or written, reported at the next call.
    call(loss, host, *features(3), torch.arange(B) + N - 3)
    assert_same_tables(before, tables(loss))
    with pytest.raises(ValueError, match="previous batch's index .* out of range"):
        loss.raise_deferred_error(wait=True)
    call(loss, host, *features(4), torch.arange(B))
    loss.raise_deferred_error(wait=True)
    assert any(not torch.equal(before[k], tables(loss)[k]) for k in before)


# ------------------------------------------------------------------ the core stands alone


def _run_blocked(code: str, blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter where importing any of ``blocked`` fails."""
    prelude = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_openclip_tau_works_without_lightly():
    code = (
        "import torch, openclip_tau, openclip_tau.train\n"
        "loss = openclip_tau.ISogCLRClipLoss(10)\n"
        "z = torch.randn(4, 8, requires_grad=True)\n"
        "loss(z, torch.randn(4, 8), index=torch.arange(4)).backward()\n"
        "assert not any(m.split('.')[0] in ('lightly', 'pytorch_lightning') for m in sys.modules)\n"
        "print('ok')\n"
    )
    result = _run_blocked(code, ("lightly", "pytorch_lightning"))
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.slow
def test_core_imports_only_torch():
    code = (
        "import tau_core\n"
        "tau_core.PerSampleState, tau_core.temperature_stats  # the names load on first use\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'lightly', 'open_clip', "
        "'open_clip_train', 'torchvision', 'numpy_financial', 'pytorch_lightning', 'webdataset'})\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    result = _run_blocked(code, ("lightly", "open_clip", "torchvision", "pytorch_lightning"))
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
    # Every import statement of the core names torch or the core itself.
    for path in (REPO_ROOT / "tau_core").rglob("*.py"):
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and not line.startswith(" "):
                top = words[1].split(".")[0]
                assert top in {
                    "torch",
                    "tau_core",
                    "__future__",
                    "abc",
                    "math",
                    "numbers",
                    "typing",
                    "dataclasses",
                    "warnings",
                    "collections",
                    "os",
                    "io",
                    "pathlib",
                    "json",
                    "datetime",
                    "itertools",
                    "functools",
                    "inspect",
                    "re",
                    "sys",
                    "ast",
                    "copy",
                    "importlib",
                }, line
