"""Comparisons of a loss's step and state with the NumPy references, shared by the loss tests."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

#: Device of the loss tests (``pytest --device cuda`` or ``TAU_TEST_DEVICE``); CPU by default.
DEVICE = torch.device(os.environ.get("TAU_TEST_DEVICE", "cpu"))


def on_device(loss, *tensors):
    """The loss moved to :data:`DEVICE`, and the tensors (and index lists) with it."""
    moved = [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in tensors]
    # A plain function (a reference built from the host's loss) has nothing to move.
    return (loss.to(DEVICE) if hasattr(loss, "to") else loss), moved


def tables(loss) -> dict[str, np.ndarray]:
    """Every per-sample table of a loss's state, as float64 NumPy."""
    return {name: loss.state.table(name).double().cpu().numpy() for name in loss.state.names}


def reference_tables(states: dict, learn_tau: bool) -> dict[str, np.ndarray]:
    """The tables the loss should hold, from reference states by role.

    The unimodal role ``sample`` has unsuffixed tables (``log_u``); image-text roles have
    ``log_u_image`` and so on.
    """
    out = {}
    for role, state in states.items():
        suffix = "" if role == "sample" else f"_{role}"
        out["log_u" + suffix] = state.log_u()
        if learn_tau:
            out["tau" + suffix] = state.tau
            out["momentum" + suffix] = state.momentum
    return out


def assert_tables(
    loss, expected: dict[str, np.ndarray], rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    got = tables(loss)
    assert set(got) == set(expected)
    for name, want in expected.items():
        np.testing.assert_allclose(got[name], want, rtol=rtol, atol=atol, err_msg=name)


def assert_step(got, want, rtol: float = 1e-4) -> None:
    """Value and the two inputs' gradients of one call against the reference's."""
    value, g0, g1 = got
    want_value, want_g0, want_g1 = want
    assert value == pytest.approx(want_value, rel=rtol, abs=1e-6)
    scale = max(np.abs(want_g0).max(), np.abs(want_g1).max())
    np.testing.assert_allclose(g0, want_g0, rtol=rtol, atol=1e-5 * scale)
    np.testing.assert_allclose(g1, want_g1, rtol=rtol, atol=1e-5 * scale)
