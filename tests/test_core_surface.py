"""The shape of the core: its user API, the adapters' submodule, the rule protocol, the state
package, and the required arguments of the stateful losses."""

from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path

import pytest
import torch

import lightly_tau.registry as lightly_registry
import openclip_tau.registry as openclip_registry
import tau_core
import tau_core.adapter
import tau_core.lazy
import tau_core.options
import tau_core.registry_source
from tau_core import (
    FixedTemperature,
    GlobalLearnedTemperature,
    GlobalTemperature,
    LearnedTemperature,
    NetworkTemperature,
    PerSampleState,
    PerSampleStateBase,
    ShardedPerSampleState,
    TemperatureNetwork,
    TemperatureRule,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

RULES = {
    "fixed": lambda: FixedTemperature(0.1),
    "learned": lambda: LearnedTemperature(0.1, 0.1, 0.05, 1.0, 0.01, 0.5, 3.0),
    "global": lambda: GlobalLearnedTemperature(0.1, GlobalTemperature(0.1, 0.05, 1.0)),
    "network": lambda: NetworkTemperature(0.1, {"": TemperatureNetwork(8)}),
}


# ---------------------------------------------------------------------- the rule protocol


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_satisfies_the_protocol(name):
    rule = RULES[name]()
    assert isinstance(rule, TemperatureRule)
    # Structurally, beyond isinstance (which sees only that the names exist): the methods take
    # the protocol's parameters, and the attributes have the protocol's types.
    for method in ("initial_values", "block_temperature", "next_rows"):
        expected = list(inspect.signature(getattr(TemperatureRule, method)).parameters)[1:]
        assert list(inspect.signature(getattr(rule, method)).parameters) == expected, method
    assert isinstance(rule.learns, bool) and isinstance(rule.trains_temperature, bool)
    assert isinstance(rule.rho, float) and rule.rho >= 0
    tables = rule.initial_values()
    assert "log_u" in tables and all(isinstance(v, float) for v in tables.values())


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_runs_through_the_protocol(name):
    """The protocol's calls, as the loss makes them, give rows of the declared tables."""
    rule = RULES[name]()
    n, views = 3, 2
    rows = {k: torch.full((n,), 0.1 if k == "tau" else 0.0) for k in rule.initial_values()}
    anchors = torch.nn.functional.normalize(torch.randn(views * n, 8), dim=1)
    tau = rule.block_temperature(rows, "", views, anchors)
    assert tau.shape == (views * n,) and bool((tau > 0).all())
    new = rule.next_rows(rows, torch.zeros(n), torch.zeros(n), "")
    assert set(new) == set(rule.initial_values())


def test_an_incomplete_rule_is_not_a_rule():
    class NoNextRows:
        learns = trains_temperature = False
        rho = 0.0

        def initial_values(self):
            return {"log_u": 0.0}

        def block_temperature(self, rows, suffix, views, anchors):
            return rows["log_u" + suffix]

    assert not isinstance(NoNextRows(), TemperatureRule)
    assert not isinstance(object(), TemperatureRule)


def test_every_stateful_loss_holds_a_rule():
    for cls in _stateful_classes():
        loss = cls(num_samples=10, **({"dim": 8} if "dim" in _parameters(cls) else {}))
        assert isinstance(loss.settings, TemperatureRule), cls.__name__


# ---------------------------------------------------------------------- the two surfaces


def test_user_api_and_adapter_plumbing_are_apart():
    user, plumbing = set(tau_core.__all__), set(tau_core.adapter.__all__)
    assert not user & plumbing
    for module in (tau_core, tau_core.adapter):
        assert len(module.__all__) == len(set(module.__all__))
        for name in module.__all__:
            assert hasattr(module, name), (module.__name__, name)
    # What only builds losses is not in the user API.
    for name in ("AnchorBlock", "with_value", "check_number", "rank", "gather_with_grad"):
        assert name in plumbing and not hasattr(tau_core, name), name
    for name in ("PerSampleState", "make_state", "save_state_shards", "TemperatureRule"):
        assert name in user


def _core_imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, names, line)`` of every import of a ``tau_core`` module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tau_core":
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tau_core":
                    found.append((alias.name, [], node.lineno))
    return found


@pytest.mark.parametrize("package", ["lightly_tau", "openclip_tau"])
def test_adapters_import_only_tau_core_and_tau_core_adapter(package):
    # and the three standard-library modules that command lines read before torch is loaded
    allowed = {
        "tau_core": tau_core,
        "tau_core.adapter": tau_core.adapter,
        "tau_core.options": tau_core.options,
        "tau_core.registry_source": tau_core.registry_source,
        "tau_core.lazy": tau_core.lazy,
    }
    seen = 0
    for path in sorted((REPO_ROOT / package).rglob("*.py")):
        for module, names, line in _core_imports(path):
            where = f"{path.relative_to(REPO_ROOT)}:{line}"
            assert module in allowed, f"{where} imports {module}"
            for name in names:
                assert name in allowed[module].__all__, f"{where}: {name} of {module}"
            seen += 1
    assert seen > 0


# ---------------------------------------------------------------------- the state package


def test_state_layouts_implement_one_base():
    for cls in (PerSampleState, ShardedPerSampleState):
        assert issubclass(cls, PerSampleStateBase)
        assert not inspect.isabstract(cls)
    assert not issubclass(ShardedPerSampleState, PerSampleState)
    assert not issubclass(PerSampleState, ShardedPerSampleState)
    assert inspect.isabstract(PerSampleStateBase)
    with pytest.raises(TypeError):
        PerSampleStateBase(4, {"log_u": 0.0})
    # Neither layout reaches past its base to nn.Module.
    for name in ("replicated.py", "sharded.py"):
        assert "nn.Module." not in (REPO_ROOT / "tau_core" / "state" / name).read_text()


def test_state_names_keep_their_import_path():
    import tau_core.state as state

    for name in (
        "EXCHANGES",
        "STATE_LAYOUTS",
        "PerSampleState",
        "ShardedPerSampleState",
        "describe_state_memory",
        "format_bytes",
        "keep_last_occurrence",
        "load_state_shards",
        "make_state",
        "save_state_shards",
        "shard_file_name",
        "state_bytes_per_rank",
    ):
        assert name in state.__all__ and hasattr(state, name), name


# ---------------------------------------------------------------------- module and function sizes


def test_core_modules_and_functions_are_small():
    """Every module of the core (the state package included) stays below 500 lines and every
    function below 80."""
    paths = sorted((REPO_ROOT / "tau_core").rglob("*.py"))
    assert len(paths) > 20 and any(p.parent.name == "state" for p in paths)
    for path in paths:
        name = str(path.relative_to(REPO_ROOT))
        text = path.read_text()
        assert len(text.splitlines()) <= 500, name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 80, f"{name}: {node.name} has {length} lines"


def test_loss_bases_and_trained_temperatures_live_in_their_own_modules():
    homes = {
        "tau_core.losses": [tau_core.ContrastiveLoss, tau_core.temperature_stats],
        "tau_core.blocks": [tau_core.adapter.AnchorBlock],
        "tau_core.global_contrastive": [tau_core.adapter.GlobalContrastiveLoss],
        "tau_core.dystress": [tau_core.adapter.DySTreSSBase],
        "tau_core.trained": [tau_core.TrainedTemperatureMixin, tau_core.adapter.derive_seed],
        "tau_core.global_temperature": [GlobalTemperature, tau_core.adapter.GlobalTemperatureLoss],
        "tau_core.temperature_network": [TemperatureNetwork, tau_core.adapter.build_networks],
    }
    for module, objects in homes.items():
        for obj in objects:
            assert obj.__module__ == module, (obj.__name__, obj.__module__)


# ---------------------------------------------------------------------- required arguments


def _stateful_classes() -> list[type]:
    classes = [c for c in lightly_registry.LOSSES.values() if "num_samples" in _parameters(c)]
    classes += [s.cls for s in openclip_registry.LOSSES.values() if s.stateful]
    assert len(classes) == 8
    return classes


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(cls.__init__).parameters)


@pytest.mark.parametrize("cls", _stateful_classes(), ids=lambda c: c.__name__)
def test_num_samples_and_dim_are_required_integers(cls):
    params, hints = _parameters(cls), typing.get_type_hints(cls.__init__)
    required = ["num_samples"] + (["dim"] if "dim" in params else [])
    for name in required:
        assert params[name].default is inspect.Parameter.empty, name
        assert hints[name] is int, name
        assert name not in tau_core.adapter.class_options(cls)  # never a hyperparameter flag
    good = {"num_samples": 10, "dim": 8}
    kwargs = {name: good[name] for name in required}
    assert cls(**kwargs).num_samples == 10  # by keyword
    with pytest.raises(TypeError, match="num_samples"):
        cls(**{k: v for k, v in kwargs.items() if k != "num_samples"})
    for name in required:
        for bad in (0, -3, 2.5, True, None):
            with pytest.raises(ValueError, match=name):
                cls(**{**kwargs, name: bad})


# ---------------------------------------------------------------------- lazy packages
@pytest.mark.parametrize(
    "package", ["tau_core", "openclip_tau", "openclip_tau.train", "lightly_tau"]
)
def test_lazy_packages_load_every_name_of_their_type_checking_block(package):
    import importlib
    from pathlib import Path

    module = importlib.import_module(package)
    homes = tau_core.lazy.type_checking_imports(Path(module.__file__))
    assert homes and set(homes) <= set(module.__all__)
    for name in module.__all__:
        home = importlib.import_module(homes.get(name, package))
        assert getattr(module, name) is getattr(home, name), name
        assert name in dir(module)
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'nope'"):
        module.nope  # noqa: B018
