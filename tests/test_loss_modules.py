"""Each adapter's losses: one module per loss, every import path of a loss the same class."""

from __future__ import annotations

import importlib

import pytest

HOSTS = ("lightly_tau", "openclip_tau")


@pytest.mark.parametrize("host", HOSTS)
def test_each_registered_loss_is_defined_in_its_own_module(host: str) -> None:
    registry = importlib.import_module(f"{host}.registry")
    package = importlib.import_module(host)
    losses = importlib.import_module(f"{host}.losses")
    for name, entry in registry.LOSSES.items():
        cls = getattr(entry, "cls", entry)
        assert cls.__module__ == f"{host}.losses.{name}", (name, cls.__module__)
        module = importlib.import_module(cls.__module__)
        assert getattr(module, cls.__name__) is cls
        assert getattr(losses, cls.__name__) is cls  # host.losses.X, as before the split
        assert getattr(package, cls.__name__) is cls  # host.X
        assert cls.__name__ in losses.__all__ and cls.__name__ in package.__all__
    defined = {c.__module__ for c in vars(losses).values() if isinstance(c, type)}
    assert len(defined) == len(registry.LOSSES), "one loss per module"
