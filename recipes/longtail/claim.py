"""iSogCLR's claim, measured so that it can fail: seeds x class orders, and per-sample density.

The iSogCLR paper (Qiu et al., ICML 2023) says its learned temperatures are larger for samples
with frequent semantics and smaller for rare ones. On a long-tailed dataset with the natural
class order, class frequency is confounded with how hard a class is, and one seed is one draw.
So the main job runs iSogCLR for several seeds under both the natural and a permuted class order,
and this module judges the claim over all those runs:

- :func:`claim_verdict`: the claim holds in a run when the Spearman correlation between class
  size and class mean temperature after the last epoch is positive with permutation p below
  ``alpha``; the verdict says whether it holds in all, some or none of the runs.
- :func:`density_analysis`: per training sample, the learned temperature against label-free
  local densities (mean cosine similarity of the k nearest training images in the learned
  feature space at the end of training and in pixel space) and against the size of its class,
  Spearman over samples with permutation p-values, and which of them explains the temperatures
  best (largest absolute rho).
- :func:`claim_tables`, :func:`plot_claim_curves`, :func:`plot_density`,
  :func:`write_per_sample_csv`: the report section's tables, plots and per-sample table.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from recipes.temperature_analysis import (
    plot_temperature_vs_density,
    pyplot,
    save_figure,
    spearman,
)

SIGNIFICANCE = 0.05
# Permutations of the per-sample Spearman tests (p cannot go below 1 / 1001).
SAMPLE_PERMUTATIONS = 1000
PREDICTORS = {
    "class_size": "class size",
    "feature_density": "local density, learned features",
    "pixel_density": "local density, pixels",
}


@dataclass
class ClaimRun:
    """One iSogCLR run of the claim: its class order, data seed, seed, per-epoch Spearman
    correlation (class size, class mean temperature) with p-values, and optionally its
    per-sample arrays (temperature, class size, feature and pixel density)."""

    class_order: str
    data_seed: int
    seed: int
    spearman: list[float]
    p_values: list[float]
    tau: Optional[np.ndarray] = None
    class_size: Optional[np.ndarray] = None
    feature_density: Optional[np.ndarray] = None
    pixel_density: Optional[np.ndarray] = None
    class_names: Optional[Sequence[str]] = None
    # Per class id: its name, its size in this run's data, its mean temperature at the end.
    classes: Optional[Sequence[str]] = None
    class_counts: Optional[Sequence[int]] = None
    class_means: Optional[Sequence[float]] = None

    @property
    def name(self) -> str:
        return f"{self.class_order} order (data seed {self.data_seed}), seed {self.seed}"

    @property
    def final(self) -> tuple[float, float]:
        if not self.spearman:
            return math.nan, math.nan
        return self.spearman[-1], self.p_values[-1]

    def holds(self, alpha: float = SIGNIFICANCE) -> bool:
        """The claim holds in this run: final rho > 0 with permutation p < ``alpha``."""
        rho, p = self.final
        return not math.isnan(rho) and rho > 0 and p < alpha


def claim_run_from_result(
    result: Any, data: Any, pixel_density: Mapping[Any, np.ndarray]
) -> ClaimRun:
    """A :class:`ClaimRun` from an iSogCLR ``RunResult`` of ``recipes.longtail.train``, the
    ``LongTailData`` it trained on, and pixel-space densities by ``(class order, data seed)``."""
    targets = data.train.targets.numpy()
    tau = (
        np.asarray(result.sample_temperatures, dtype=np.float64)
        if result.sample_temperatures
        else None
    )
    feature = (
        np.asarray(result.sample_density, dtype=np.float64)
        if result.sample_density is not None
        else None
    )
    per_class = (result.temperatures or {}).get("per_class", [])
    return ClaimRun(
        class_order=result.class_order,
        data_seed=result.data_seed,
        seed=result.seed,
        spearman=[float(h.get("spearman", math.nan)) for h in result.history],
        p_values=[float(h.get("p_value", math.nan)) for h in result.history],
        tau=tau,
        class_size=np.asarray(data.class_counts)[targets],
        feature_density=feature,
        pixel_density=pixel_density.get((result.class_order, result.data_seed)),
        class_names=[data.classes[c] for c in targets.tolist()],
        classes=list(data.classes),
        class_counts=list(data.class_counts),
        class_means=[c["mean"] for c in per_class] or None,
    )


def claim_rows(
    runs: Sequence[ClaimRun], analyses: Sequence[Mapping[str, Any]], alpha: float = SIGNIFICANCE
) -> list[dict[str, Any]]:
    """One flat row per claim run (``claim.csv``): final and highest Spearman, whether the claim
    holds, and the per-sample correlations where they were computed."""
    by_run = {a["run"]: a for a in analyses}
    rows = []
    for r in runs:
        rho, p = r.final
        finite = [(v, e + 1) for e, v in enumerate(r.spearman) if not math.isnan(v)]
        best = max(finite, default=(math.nan, 0))
        row: dict[str, Any] = {
            "class_order": r.class_order,
            "data_seed": r.data_seed,
            "seed": r.seed,
            "epochs": len(r.spearman),
            "spearman_final": rho,
            "p_value_final": p,
            "spearman_max": best[0],
            "spearman_max_epoch": best[1],
            "significant_epochs": int(
                sum(1 for v, q in zip(r.spearman, r.p_values) if v > 0 and q < alpha)
            ),
            "holds": r.holds(alpha),
        }
        analysis = by_run.get(r.name, {})
        for key in PREDICTORS:
            entry = analysis.get(key, {})
            row[f"rho_tau_{key}"] = entry.get("rho", math.nan)
            row[f"p_tau_{key}"] = entry.get("p_value", math.nan)
        rows.append(row)
    return rows


def claim_verdict(runs: Sequence[ClaimRun], alpha: float = SIGNIFICANCE) -> dict[str, Any]:
    """Whether the claim holds in ``all``, ``some`` or ``none`` of the runs.

    A run supports the claim when its Spearman correlation between class size and class mean
    temperature after the last epoch is positive with permutation p below ``alpha``
    (:meth:`ClaimRun.holds`). Returns ``kind`` (``all``, ``some``, ``none``; ``none`` also when
    there are no runs), ``holds`` and ``runs`` (counts), ``supporting`` (run names) and a
    one-line ``text`` for the report.

    Example: finals (+0.75, p 0.02), (+0.24, p 0.52) give ``some``: 1 of 2 runs.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    supporting = [r.name for r in runs if r.holds(alpha)]
    n, k = len(runs), len(supporting)
    kind = "none" if k == 0 else ("all" if k == n else "some")
    rule = (
        f"Spearman(class size, class mean temperature) > 0 with permutation p < {alpha:g} "
        "after the last epoch"
    )
    finals = ", ".join(f"{r.final[0]:+.2f} (p {r.final[1]:.3f})" for r in runs)
    if n == 0:
        text = "No iSogCLR runs, so the temperature-frequency claim was not tested."
    elif kind == "all":
        text = f"The claim holds in all {n} runs ({rule}): {finals}."
    elif kind == "none":
        text = f"The claim holds in none of the {n} runs ({rule}): {finals}."
    else:
        text = (
            f"The claim holds in {k} of {n} runs ({rule}): {finals}. It holds only for "
            f"{' and '.join(supporting)}; the other runs do not show it, so these runs do not "
            "establish it as the method's general behaviour."
        )
    return {"kind": kind, "holds": k, "runs": n, "supporting": supporting, "text": text}


def density_analysis(
    run: ClaimRun, permutations: int = SAMPLE_PERMUTATIONS, seed: int = 0
) -> dict[str, Any]:
    """Spearman over samples of the learned temperature against each predictor that the run has
    (class size, feature-space density, pixel-space density), with permutation p-values, and the
    predictor with the largest ``|rho|`` as ``best``."""
    if run.tau is None:
        raise ValueError(f"{run.name}: no per-sample temperatures to analyse")
    out: dict[str, Any] = {"run": run.name, "samples": int(len(run.tau))}
    best, best_value = None, -1.0
    for key in PREDICTORS:
        values = getattr(run, key)
        if values is None:
            continue
        if len(values) != len(run.tau):
            raise ValueError(
                f"{run.name}: {key} has {len(values)} values for {len(run.tau)} temperatures"
            )
        rho, p = spearman(values, run.tau, permutations=permutations, seed=seed)
        out[key] = {"rho": rho, "p_value": p}
        if not math.isnan(rho) and abs(rho) > best_value:
            best, best_value = key, abs(rho)
    out["best"] = best
    return out


def density_verdict(analyses: Sequence[Mapping[str, Any]]) -> str:
    """One line: which predictor had the largest ``|rho|`` in how many runs."""
    if not analyses:
        return "No per-sample analysis was run."
    counts = Counter(a["best"] for a in analyses if a.get("best"))
    parts = [f"{PREDICTORS[k]} in {v} of {len(analyses)} runs" for k, v in counts.most_common()]

    def mean_rho(key: str) -> str:
        values = [a[key]["rho"] for a in analyses if key in a]
        return f"{np.mean(values):+.2f}" if values else "–"

    means = ", ".join(f"{PREDICTORS[k]} {mean_rho(k)}" for k in PREDICTORS)
    return (
        "Largest |Spearman| with the per-sample temperature: "
        + "; ".join(parts)
        + f" (mean rho over runs: {means})."
    )


# --------------------------------------------------------------------------- files and plots
def write_per_sample_csv(path: Path, runs: Sequence[ClaimRun]) -> None:
    """One row per run and training sample: temperature, class, class size, densities."""
    frames = []
    for run in (r for r in runs if r.tau is not None):
        frame = pd.DataFrame(
            {
                "class_order": run.class_order,
                "data_seed": run.data_seed,
                "seed": run.seed,
                "index": np.arange(len(run.tau)),
                "class": run.class_names if run.class_names is not None else "",
            }
        )
        for key in ("class_size", "tau", "feature_density", "pixel_density"):
            values = getattr(run, key)
            frame[key] = [f"{v:.6g}" for v in values] if values is not None else ""
        frames.append(frame)
    pd.concat(frames).to_csv(path, index=False, lineterminator="\r\n")


def plot_claim_curves(path: Path, runs: Sequence[ClaimRun]) -> None:
    """Spearman(class size, class mean temperature) per epoch, one line per run (natural order
    solid, permuted dashed), with the p < 0.05 epochs marked by filled dots."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        epochs = np.arange(1, len(run.spearman) + 1)
        style = "-" if run.class_order == "natural" else "--"
        (line,) = ax.plot(epochs, run.spearman, style, label=run.name)
        significant = np.asarray(run.p_values) < SIGNIFICANCE
        ax.plot(epochs, run.spearman, "o", mfc="none", color=line.get_color())
        ax.plot(
            epochs[significant], np.asarray(run.spearman)[significant], "o", color=line.get_color()
        )
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("epoch")
    ax.set_ylabel("Spearman rho over classes")
    ax.set_title("iSogCLR: class size vs class mean temperature (filled: p < 0.05)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_density(path: Path, runs: Sequence[ClaimRun]) -> None:
    """Per-sample temperature against local density (learned features, pixels), one row per
    run given, points coloured by class."""
    plt = pyplot()
    runs = [r for r in runs if r.tau is not None]
    columns = [k for k in ("feature_density", "pixel_density")]
    fig, axes = plt.subplots(
        max(1, len(runs)), len(columns), figsize=(11, 3.8 * max(1, len(runs))), squeeze=False
    )
    for row, run in enumerate(runs):
        for col, key in enumerate(columns):
            ax = axes[row, col]
            values = getattr(run, key)
            if values is None:
                ax.axis("off")
                continue
            plot_temperature_vs_density(ax, values, run.tau, groups=run.class_names)
            ax.set_xlabel(f"{PREDICTORS[key]} (mean cosine of k nearest)", fontsize=8)
            ax.set_title(f"{run.name}\n" + ax.get_title(), fontsize=8)
    save_figure(fig, path, dpi=100)


# --------------------------------------------------------------------------- markdown
def _rho(value: float, p: float) -> str:
    if math.isnan(value):
        return "–"
    return f"{value:+.2f} ({p:.3f})" if not math.isnan(p) else f"{value:+.2f}"


def _markdown(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, disable_numparse=True)


def claim_tables(
    runs: Sequence[ClaimRun], verdict: Mapping[str, Any], analyses: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """What the report's claim section (``templates/claim.md.j2``) shows: the verdict, the
    Spearman of every run after each epoch, each class's final mean temperature with its size in
    each run's data, and the per-sample analysis (tables as Markdown; empty when absent)."""
    names = [f"{r.class_order}, seed {r.seed}" for r in runs]
    epochs = pd.DataFrame(
        {
            name: [_rho(*pair) for pair in zip(r.spearman, r.p_values)]
            for name, r in zip(names, runs)
        }
        if runs
        else {}
    )
    epochs = epochs.reindex(range(max((len(r.spearman) for r in runs), default=0))).fillna("–")
    epochs.insert(0, "epoch", [str(e + 1) for e in epochs.index])
    with_means = [(n, r) for n, r in zip(names, runs) if r.class_means is not None and r.classes]
    classes = ""
    if with_means:
        frame = pd.DataFrame({"class": list(with_means[0][1].classes or [])})
        for name, r in with_means:
            frame[name] = [f"{m:.3f} ({n})" for m, n in zip(r.class_means, r.class_counts)]
        classes = _markdown(frame)
    density = pd.DataFrame(
        [
            [a["run"], str(a["samples"])]
            + [_rho(a[k]["rho"], a[k]["p_value"]) if k in a else "–" for k in PREDICTORS]
            + [PREDICTORS.get(a.get("best") or "", "–")]
            for a in analyses
        ],
        columns=["run", "samples", *PREDICTORS.values(), "largest |rho|"],
    )
    return {
        "verdict": verdict,
        "epochs": _markdown(epochs),
        "classes": classes,
        "density": _markdown(density) if analyses else "",
        "density_verdict": density_verdict(analyses),
        "permutations": SAMPLE_PERMUTATIONS,
    }
