"""The adapters' loss registries: options read from the classes, and one entry reaches every CLI."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest

from lightly_tau import registry as lightly_registry
from openclip_tau import registry as openclip_registry
from tau_core.options import PLUMBING, docstring_help

REGISTRIES = {"lightly": lightly_registry, "openclip": openclip_registry}


def _signature_defaults(cls: type) -> dict:
    return {
        n: p.default
        for n, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty and n not in PLUMBING
    }


@pytest.mark.parametrize("host", REGISTRIES)
def test_options_are_the_signatures_keywords_with_their_defaults_and_help(host: str) -> None:
    registry = REGISTRIES[host]
    for name, entry in registry.LOSSES.items():
        cls = getattr(entry, "cls", entry)
        options = registry.options(name)
        assert {k: o.default for k, o in options.items()} == _signature_defaults(cls)
        assert all(o.help for k, o in options.items() if k != "lr_tau_drop_factor"), name
        assert not any("Default" in o.help for o in options.values())


def test_bounds_are_read_from_the_classes() -> None:
    r = lightly_registry
    for name in ("isogclr", "rgclg", "tempnet", "dystress"):
        defaults = _signature_defaults(r.LOSSES[name])  # bounds: the classes' tau_min/tau_max
        assert r.temperature_bounds(name) == (defaults["tau_min"], defaults["tau_max"])
    assert r.temperature_bounds("rgclg", tau_max=0.7) == (0.05, 0.7)
    assert r.temperature_bounds("sogclr", temperature=0.3) == (0.3, 0.3)
    assert [n for n in r.LOSSES if r.uses_index(n)] == ["sogclr", "isogclr", "rgclg", "tempnet"]
    assert [n for n in r.LOSSES if r.trains_temperature(n)] == ["rgclg", "tempnet"]


def test_build_passes_host_settings_and_refuses_foreign_keywords() -> None:
    loss = lightly_registry.build("tempnet", 10, dim=8, rho=0.5)
    assert loss.num_samples == 10 and loss.temperature_networks["sample"] is not None
    with pytest.raises(ValueError, match="eta do not apply to loss 'dystress'"):
        lightly_registry.build("dystress", eta=0.1)
    with pytest.raises(ValueError, match="loss must be one of"):
        lightly_registry.build("nope")


def test_docstring_help_splits_shared_entries_and_drops_defaults() -> None:
    class Loss:
        """A loss.

        Attributes:
            tau_min, tau_max: Bounds of the temperatures. Defaults 0.05 and 1.0.
            eta: Step size; a longer
                line. Default 0.03.
        """

    assert docstring_help(Loss) == {
        "tau_min": "Bounds of the temperatures",
        "tau_max": "Bounds of the temperatures",
        "eta": "Step size; a longer line",
    }


def test_openclip_options_keep_the_train_flags() -> None:
    from openclip_tau import train

    table = openclip_registry.loss_options()
    assert table["tau_rho"][0] == "rho" and table["tau_lr"][0] == "lr_tau"
    assert table["tau_prototypes"][0] == "num_prototypes"
    assert table["tau_lr_drop_below"][1] is openclip_registry.float_or_off
    assert set(table) == set(train.LOSS_OPTIONS)
    assert train.LOSS_CHOICES == openclip_registry.loss_choices()


DUMMY = textwrap.dedent(
    '''
    import contextlib, io, sys
    from tau_core.options import LossOption

    class DummyLoss:
        """A dummy loss.

        Attributes:
            num_samples: Table size.
            tau_min, tau_max: Range of the dummy temperatures. Defaults 0.2 and 0.4.
            wobble: How much the dummy wobbles. Default 1.5.
        """

        def __init__(self, num_samples=None, *, tau_min: float = 0.2, tau_max: float = 0.4,
                     wobble: float = 1.5, gather_distributed: bool = False) -> None:
            pass

    def help_of(main, *args):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([*args, "--help"])
        return out.getvalue()
    '''
)


@pytest.mark.slow
def test_a_loss_added_to_lightly_tau_registry_reaches_every_lightly_cli() -> None:
    code = DUMMY + textwrap.dedent(
        """
        from lightly_tau import registry
        registry.LOSSES["dummy"] = DummyLoss
        from recipes.longtail import run, sweep
        from recipes.simclr import simclr, simclr_lightning
        for name, main in [("longtail", run.main), ("sweep", sweep.main),
                           ("simclr", simclr.main), ("lightning", simclr_lightning.main)]:
            text = help_of(main)
            print(name, "dummy" in text, "wobble" in text)
        from recipes.longtail.train import LOSS_REGISTRY, LossSettings
        print("bounds", LOSS_REGISTRY["dummy"].bounds(LossSettings()))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    for cli in ("longtail", "simclr", "lightning"):
        assert lines[cli].split()[:2] == ["True", "True"], (cli, done.stdout)
    assert lines["sweep"].split()[0] == "True"
    assert lines["bounds"] == "(0.2, 0.4)"


@pytest.mark.slow
def test_a_loss_added_to_openclip_tau_registry_reaches_every_openclip_cli() -> None:
    code = DUMMY + textwrap.dedent(
        """
        from openclip_tau import registry
        registry.LOSSES["dummy"] = registry.LossSpec(DummyLoss)
        from openclip_tau import train
        from recipes.cc3m import smoke
        print("smoke", "dummy" in help_of(smoke.main, "--output", "x"))
        parser = train.build_parser()
        text = parser.format_help()
        print("train", "dummy" in text, "--tau-wobble" in text)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "smoke True" in done.stdout
    assert "train True True" in done.stdout
