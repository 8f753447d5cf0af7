"""``--help`` of the entry points answers before torch and the host libraries are imported."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from importlib.metadata import distribution

import pytest

from tau_core import registry_source

HOSTS = ("lightly_tau", "openclip_tau")

# What a command needs only once it runs (each costs seconds of CPU to import).
HOST_LIBRARIES = (
    "torch",
    "lightly",
    "pytorch_lightning",
    "lightning",
    "torchvision",
    "matplotlib",
    "open_clip",
    "pandas",
    "scipy",
    "sklearn",
)  # open_clip_train's parser (its params module) imports argparse only; its main imports torch
ENTRY_POINTS = (
    "recipes.longtail",
    "recipes.longtail.sweep",
    "recipes.simclr.simclr",
    "recipes.simclr.simclr_lightning",
    "recipes.cc3m.smoke",
    "recipes.cc3m.evaluate",
    "recipes.cc3m.analyze",
    "recipes.cc3m.shards",
    "recipes.cc3m.tsv",
    "recipes.cc3m.make_smoke_data",
    "openclip_tau.key_index",
    "openclip_tau.train",
    "recipes.analyze_temperatures",
)
PROBE = """
import contextlib, io, resource, runpy, sys
module = sys.argv[1]
sys.argv = [module, "--help"]
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    runpy.run_module(module, run_name="__main__", alter_sys=True)
usage = resource.getrusage(resource.RUSAGE_SELF)
loaded = sorted({name.split(".")[0] for name in sys.modules} & set({hosts}))
print(usage.ru_utime + usage.ru_stime, ",".join(loaded), "usage:" in out.getvalue())
"""


CONSOLE_PROBE = """
import contextlib, importlib, io, sys
module, name = sys.argv[1].split(":")
sys.argv = [sys.argv[2], "--help"]
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    getattr(importlib.import_module(module), name)()
print(0, "torch" in sys.modules, "usage:" in out.getvalue())
"""
SCRIPTS = {
    e.name: e.value
    for e in distribution("lightly-tau").entry_points
    if e.group == "console_scripts"
}


def _probe(code: str, *args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split(" ")


@pytest.mark.slow
@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_imports_no_host_library(module: str) -> None:
    code = PROBE.replace("{hosts}", repr(HOST_LIBRARIES))
    _, loaded, has_usage = _probe(code, module)
    assert has_usage.strip() == "True"
    assert loaded == "", f"{module} --help imported {loaded}"


@pytest.mark.slow
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_console_script_help_imports_no_torch(script: str) -> None:
    _, torch_loaded, has_usage = _probe(CONSOLE_PROBE, SCRIPTS[script], script)
    assert (torch_loaded, has_usage.strip()) == ("False", "True")


@pytest.mark.parametrize("host", HOSTS)
def test_registry_read_from_source_equals_the_imported_registry(host: str) -> None:
    """The options ``--help`` reads from the source are those of the classes themselves."""
    registry = importlib.import_module(f"{host}.registry")
    classes, constants = registry_source._from_source(host)
    assert list(classes) == list(registry.LOSSES)
    for name, stub in classes.items():
        read = registry_source.options.class_options(stub)
        live = registry.options(name)
        assert {k: dataclasses.astuple(o) for k, o in read.items()} == {
            k: dataclasses.astuple(o) for k, o in live.items()
        }, name
    if host == "openclip_tau":
        assert constants["UPSTREAM_LOSSES"] == registry.UPSTREAM_LOSSES
