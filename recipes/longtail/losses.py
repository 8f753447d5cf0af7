"""The losses of the long-tailed comparison: Lightly's and every loss of ``lightly_tau.registry``.

Lightly's ``NTXentLoss`` with a fixed temperature, the same with the cosine temperature schedule
of Kukleva et al. (ICLR 2023), ``MACLLoss`` (model-aware temperature) and ``DCLLoss`` are this
recipe's entries; every loss of :data:`lightly_tau.registry.LOSSES` joins them with one
``--NAME-KEYWORD`` option per hyperparameter (type, default and help text read from the class)
and its bounds read from the class. :data:`RECIPE_DEFAULTS` (in ``settings``) lists where this recipe's defaults
differ from the classes' (short runs), :data:`NOTES` the report's wording per loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from lightly.loss import DCLLoss, MACLLoss, NTXentLoss
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn
from torch.nn import functional as F

from lightly_tau import registry
from recipes.longtail.names import DEFAULT_LOSSES, HOST_LOSS_NAMES  # noqa: F401
from recipes.longtail.settings import (  # noqa: F401
    RECIPE_DEFAULTS,
    SHARED,
    LossSettings,
    hyperparameters,
    registry_settings,
)

BatchTemperature = Callable[[nn.Module, Tensor, Tensor], "tuple[Tensor, Optional[Tensor]]"]


def stats_temperature(loss: nn.Module, z0: Tensor, z1: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """The batch temperature a ``lightly_tau`` loss reports in ``stats``: ``tau_mean`` (and
    ``tau_positive_mean`` where the loss has one). The default of :class:`LossSpec`."""
    stats = loss.stats  # type: ignore[attr-defined]
    return stats["tau_mean"], stats.get("tau_positive_mean")


def fixed_temperature(loss: nn.Module, z0: Tensor, z1: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """The loss's ``temperature`` attribute (NT-Xent, its cosine schedule, DCL)."""
    return torch.tensor(float(loss.temperature)), None  # type: ignore[attr-defined]


def dystress_temperature(
    loss: nn.Module, z0: Tensor, z1: Tensor
) -> tuple[Tensor, Optional[Tensor]]:
    """DySTreSS: mean temperature of the negative pairs, and of the positive pairs."""
    stats = loss.stats  # type: ignore[attr-defined]
    return stats["tau_negative_mean"], stats["tau_positive_mean"]


def macl_temperature(loss: nn.Module, z0: Tensor, z1: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """MACL's model-aware temperature of the batch, recomputed as Lightly's ``MACLLoss`` does.

    ``t = tau_0 * (1 + alpha * (A - A_0))`` with ``A`` the batch's mean positive cosine
    similarity (Huang et al., ICML 2023, arXiv 2207.07874; ``lightly/loss/macl_loss.py``:
    ``A = mean(pos)`` over both directions, which is the mean of ``cos(z0_i, z1_i)``).
    """
    with torch.no_grad():
        alignment = F.cosine_similarity(z0.float(), z1.float(), dim=1).mean()
    return loss.temperature * (1 + loss.alpha * (alignment - loss.A_0)), None  # type: ignore[attr-defined]


@dataclass(frozen=True)
class LossSpec:
    """One entry of :data:`LOSS_REGISTRY`: how to build a loss and read its temperature.

    A label, the options that set it (named in errors), ``build(settings, num_samples,
    gather_distributed)``, what kind of temperature it has (a phrase for the report), the range
    its temperatures stay in, a settings line for the report, whether it takes the dataset
    index, and how to read the batch's temperature after a step (``batch_temperature(loss, z0,
    z1)``: the temperature applied to negatives' logits and, where it differs, to positives';
    the default reads ``stats["tau_mean"]``). ``per_sample`` marks losses whose ``tau``
    attribute is a per-sample temperature table (the report relates it to class frequency and
    local density). ``before_step(loss, settings, step, steps_per_epoch, max_steps)`` sets a
    schedule before each step.
    """

    label: str
    flags: str
    build: Callable[[Any, int, bool], nn.Module]
    temperature_kind: str
    bounds: Callable[[Any], tuple[float, float]]
    describe: Callable[[Any], str]
    uses_index: bool = False
    per_sample: bool = False
    batch_temperature: BatchTemperature = stats_temperature
    before_step: Optional[Callable[[nn.Module, Any, int, int, int], None]] = None


def cosine_temperature(settings: Any, step: int, steps_per_epoch: int, max_steps: int) -> float:
    """Kukleva et al.'s schedule, ``tau_max`` at step 0, ``tau_min`` half a period later."""
    s = settings
    period = max(1, round(s.cosine_period_epochs * steps_per_epoch))
    return cosine_schedule(step, max_steps, s.cosine_tau_max, s.cosine_tau_min, period)


def _set_cosine_temperature(
    loss: nn.Module, settings: Any, step: int, steps_per_epoch: int, max_steps: int
) -> None:
    loss.temperature = cosine_temperature(settings, step, steps_per_epoch, max_steps)


def _fixed(s: Any) -> tuple[float, float]:
    return s.temperature, s.temperature


HOST_LOSSES: dict[str, LossSpec] = {
    "ntxent": LossSpec(
        label="NT-Xent",
        flags="--temperature",
        build=lambda s, n, g: NTXentLoss(temperature=s.temperature, gather_distributed=g),
        temperature_kind="fixed",
        bounds=_fixed,
        describe=lambda s: f"Lightly NTXentLoss, temperature {s.temperature:g}",
        batch_temperature=fixed_temperature,
    ),
    "ntxent-cosine": LossSpec(
        label="NT-Xent + cosine tau",
        flags="--cosine-tau-*",
        build=lambda s, n, g: NTXentLoss(temperature=s.cosine_tau_max, gather_distributed=g),
        temperature_kind="scheduled (cosine, per step)",
        bounds=lambda s: (s.cosine_tau_min, s.cosine_tau_max),
        describe=lambda s: (
            f"temperature from {s.cosine_tau_max:g} down to {s.cosine_tau_min:g} and back every "
            f"{s.cosine_period_epochs:g} epochs (Kukleva et al.: 400 epochs in a 2000-epoch run; "
            "here the same five cycles per run unless --cosine-period is given), per step with "
            "lightly.utils.scheduler.cosine_schedule"
        ),
        batch_temperature=fixed_temperature,
        before_step=_set_cosine_temperature,
    ),
    "macl": LossSpec(
        label="MACL",
        flags="--macl-*",
        build=lambda s, n, g: MACLLoss(
            temperature=s.macl_temperature, alpha=s.macl_alpha, A_0=s.macl_a0
        ),
        temperature_kind="model-aware: tau_0 (1 + alpha (A - A_0)) from the batch's alignment A",
        bounds=lambda s: (
            s.macl_temperature * (1 + s.macl_alpha * (-1 - s.macl_a0)),
            s.macl_temperature * (1 + s.macl_alpha * (1 - s.macl_a0)),
        ),
        describe=lambda s: (
            f"Lightly MACLLoss, tau_0 {s.macl_temperature:g}, alpha {s.macl_alpha:g}, "
            f"A_0 {s.macl_a0:g} (Lightly's defaults; no gathering across processes)"
        ),
        batch_temperature=macl_temperature,
    ),
    "dcl": LossSpec(
        label="DCL",
        flags="--temperature",
        build=lambda s, n, g: DCLLoss(temperature=s.temperature, gather_distributed=g),
        temperature_kind="fixed (positive left out of the denominator)",
        bounds=_fixed,
        describe=lambda s: f"Lightly DCLLoss, temperature {s.temperature:g}, no weighting",
        batch_temperature=fixed_temperature,
    ),
}


@dataclass(frozen=True)
class Note:
    """The report's wording for a registry loss (a loss without one gets a generic one)."""

    label: str
    temperature_kind: str
    describe: Callable[[Any, tuple[float, float]], str]
    per_sample: bool = False
    batch_temperature: BatchTemperature = stats_temperature


NOTES: dict[str, Note] = {
    "sogclr": Note(
        "SogCLR",
        "fixed (global)",
        lambda s, b: f"temperature {s.temperature:g}, gamma {s.sogclr_gamma:g}",
    ),
    "isogclr": Note(
        "iSogCLR",
        "learned, one per sample",
        lambda s, b: (
            f"rho {s.isogclr_rho:g}, eta {s.isogclr_eta:g}, beta {s.isogclr_beta:g}, gamma "
            f"{s.isogclr_gamma:g}, tau_init {s.isogclr_tau_init:g}, range [{b[0]:g}, {b[1]:g}]"
        ),
        per_sample=True,
    ),
    "rgclg": Note(
        "RGCL-g",
        "learned, one global (DRO)",
        lambda s, b: (
            f"rho {s.rgclg_rho:g}, tau_init {s.rgclg_tau_init:g} in [{b[0]:g}, {b[1]:g}], "
            f"its own AdamW lr {s.rgclg_lr_tau:g}"
        ),
    ),
    "tempnet": Note(
        "TempNet",
        "predicted per sample by a network",
        lambda s, b: (
            f"rho {s.tempnet_rho:g}, tau in [{b[0]:g}, {b[1]:g}], network's own AdamW lr "
            f"{s.tempnet_lr_tau:g} (x{s.tempnet_lr_tau_decay:g} per epoch)"
        ),
    ),
    "dystress": Note(
        "DySTreSS",
        "per pair, from its similarity",
        lambda s, b: f"tau_min {b[0]:g}, tau_max {b[1]:g}",
        batch_temperature=dystress_temperature,
    ),
}


def _generic_note(name: str) -> Note:
    kind = "trained" if registry.trains_temperature(name) else "from the loss"
    return Note(
        registry.loss_class(name).__name__,
        kind,
        lambda s, b: ", ".join(f"{k} {v}" for k, v in hyperparameters(name, s).items()),
    )


def registry_spec(name: str) -> LossSpec:
    """The recipe's entry for loss ``name`` of ``lightly_tau.registry``."""
    note = NOTES.get(name) or _generic_note(name)

    def bounds(s: Any) -> tuple[float, float]:
        return registry.temperature_bounds(name, **hyperparameters(name, s))

    def build(s: Any, n: int, g: bool) -> nn.Module:
        kwargs = hyperparameters(name, s)
        return registry.build(name, n, dim=s.embedding_dim, gather_distributed=g, **kwargs)

    shared = "".join(f"--{f.replace('_', '-')}/" for f in SHARED.get(name, {}).values())
    return LossSpec(
        label=note.label,
        flags=f"{shared}--{name}-*",
        build=build,
        temperature_kind=note.temperature_kind,
        bounds=bounds,
        describe=lambda s: note.describe(s, bounds(s)),
        uses_index=registry.uses_index(name),
        per_sample=note.per_sample,
        batch_temperature=note.batch_temperature,
    )


def _ordered() -> dict[str, LossSpec]:
    ours = {name: registry_spec(name) for name in registry.LOSSES}
    # The report's order: Lightly's fixed and scheduled temperatures, then the registry's.
    return {**HOST_LOSSES, **ours}


LOSS_REGISTRY: dict[str, LossSpec] = _ordered()
LOSSES = tuple(LOSS_REGISTRY)
LOSS_LABELS = {name: spec.label for name, spec in LOSS_REGISTRY.items()}
assert tuple(HOST_LOSSES) == HOST_LOSS_NAMES, "recipes.longtail.names lists Lightly's losses"
