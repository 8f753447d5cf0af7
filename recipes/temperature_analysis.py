"""Recipe-independent analysis of learned per-sample temperatures (iSogCLR and the like).

The CC3M recipe (``recipes/cc3m/analyze.py``: a temperature per image and per caption) and the
long-tail recipe (``recipes/longtail``: a temperature per training image) ask the same questions
of their temperatures: how are they distributed, which samples sit at either end, and do they
follow a frequency (word frequency, class size)? This module holds the one implementation of
each piece both use:

- :func:`average_ranks` and :func:`spearman`: Spearman's rank correlation with ties and a
  two-sided permutation p-value;
- :func:`quantiles`: min, p10, p50, p90, max and mean of a temperature array (pandas);
- :func:`histogram_bins`: histogram edges over the range the temperatures occupy, log-spaced
  when they span a decade or more;
- :func:`extremes`: the k highest and the k lowest rows of a frame by a column;
- :func:`plot_distribution_by_group`: histograms of temperatures, one per group, on one axes;
- :func:`knn_density`: a label-free local density of every sample (the mean cosine similarity of
  its k nearest neighbours), the "how many similar samples does it have" of iSogCLR's mechanism;
- :func:`plot_temperature_vs_density`: per-sample temperature against that density;
- :func:`plot_extremes_grid`: the images at either end of the temperatures;

NumPy, pandas and matplotlib (Agg backend) only: no torch, so the analysis runs wherever the
saved temperatures can be read.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

# Permutations of the Spearman p-value unless a caller asks for another count.
DEFAULT_PERMUTATIONS = 20000
# Elements of the (permutations x n) block of shuffled ranks held at once.
_PERMUTATION_BLOCK = 1 << 22
# Width given to the bins of values that are all equal (relative to the value, at least 1e-6).
_DEGENERATE_WIDTH = 1e-3


# ----------------------------------------------------------------------------- correlation
def average_ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values``, ties given the average of the ranks they span
    (``scipy.stats.rankdata``): ``[10, 20, 20, 30]`` gets ``[1, 2.5, 2.5, 4]``."""
    return stats.rankdata(np.asarray(values, dtype=np.float64), method="average")


def spearman(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
) -> tuple[float, float]:
    """Spearman's rank correlation of ``x`` and ``y`` and its two-sided permutation p-value.

    rho is ``scipy.stats.spearmanr`` (the Pearson correlation of the average ranks, so ties are
    handled). The p-value is ``scipy.stats.permutation_test``'s over re-pairings of the ranks
    with the statistic ``|rho|``: ``(1 + #{|rho_perm| >= |rho|}) / (1 + permutations)`` over
    ``permutations`` seeded random re-pairings (every pairing, exactly, where there are fewer).
    It makes no distributional assumption and is valid for any n, but it cannot be smaller
    than ``1 / (1 + permutations)``. ``permutations=0`` skips the test (p is NaN) where only rho
    is wanted.

    Pairs where either value is NaN are dropped. Returns ``(nan, nan)`` for fewer than three
    pairs or when either variable is constant (the correlation is undefined).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.shape} and {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    rx, ry = average_ranks(x[keep]), average_ranks(y[keep])
    n = len(rx)
    if n < 3 or rx.std() == 0 or ry.std() == 0:
        return math.nan, math.nan
    rho = float(stats.spearmanr(rx, ry).statistic)
    if permutations <= 0:
        return rho, math.nan
    rx, ry = (rx - rx.mean()) / rx.std(), (ry - ry.mean()) / ry.std()

    def abs_rho(a: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.abs(a @ rx / n)

    test = stats.permutation_test(
        (ry,),
        abs_rho,
        permutation_type="pairings",
        vectorized=True,
        n_resamples=permutations,
        alternative="greater",
        # Shuffled rank vectors in blocks, so that memory stays bounded for large n.
        batch=max(1, _PERMUTATION_BLOCK // n),
        rng=np.random.default_rng(seed),
    )
    return rho, float(test.pvalue)


# ----------------------------------------------------------------------------- summaries
#: Names of :func:`quantiles` (the core's ``tau_core.temperature_stats`` uses the same levels).
QUANTILES = {"min": "min", "p10": "10%", "p50": "50%", "p90": "90%", "max": "max", "mean": "mean"}
#: The order tables show them in.
QUANTILE_COLUMNS = ["mean", "min", "p10", "p50", "p90", "max"]


def quantiles(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """``min``, ``p10``, ``p50``, ``p90``, ``max`` (linear interpolation) and ``mean`` of values.

    ``pandas.Series.describe`` at the levels of ``tau_core.temperature_stats``, in float64. An
    empty array gives an empty dict; values are taken as given (filter unvisited or NaN samples
    first).
    """
    if len(values) == 0:
        return {}
    described = pd.Series(np.asarray(values, dtype=np.float64)).describe(
        percentiles=[0.1, 0.5, 0.9]
    )
    return {name: float(described[key]) for name, key in QUANTILES.items()}


def extremes(frame: pd.DataFrame, column: str, k: int) -> pd.DataFrame:
    """The ``k`` rows of ``frame`` with the highest and the ``k`` with the lowest ``column``.

    Returns the highest rows (largest first) followed by the lowest (smallest first), with two
    columns put in front: ``end`` (``highest`` or ``lowest``) and ``rank`` (1..k within the end),
    and the frame's own columns after them (its index is dropped). Rows where ``column`` is NaN
    are left out; equal values keep frame order in ``lowest`` and reverse frame order in
    ``highest`` (one stable ascending sort read from both ends). With fewer than ``2k`` rows the
    two ends share rows.
    """
    ordered = frame[frame[column].notna()].sort_values(column, kind="stable")
    parts = []
    for end, part in (("highest", ordered.iloc[::-1][:k]), ("lowest", ordered[:k])):
        part = part.reset_index(drop=True)
        part.insert(0, "rank", np.arange(1, len(part) + 1))
        part.insert(0, "end", end)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


# ----------------------------------------------------------------------------- local density
def knn_density(
    features: Sequence[Sequence[float]] | np.ndarray, k: int = 20, chunk: int = 1024
) -> np.ndarray:
    """Mean cosine similarity of each sample to its ``k`` nearest other samples.

    ``density_i = (1/k) * sum of the k largest cos(x_i, x_j) over j != i``, with the rows of
    ``features`` (n, d) L2-normalised here. A sample with many similar samples (frequent
    semantics, in iSogCLR's words) has a high density; an isolated one a low density. No labels
    are used. Computed in row chunks of ``chunk`` (memory ``chunk * n`` floats), float32 products.

    Example: three points on a line, ``[[1, 0], [1, 0], [0, 1]]`` with ``k=1``: the first two
    are each other's nearest neighbour (density 1), the third's nearest has cosine 0.

    Raises:
        ValueError: If ``features`` is not 2-D or ``k`` is not in ``[1, n - 1]``.
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array (samples, dimensions), got shape {x.shape}")
    n = x.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} samples, got {k}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.maximum(norms, 1e-12)
    density = np.empty(n, dtype=np.float64)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        sims = x[start:stop] @ x.T
        sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # not its own neighbour
        top = np.partition(sims, n - k, axis=1)[:, n - k :]
        density[start:stop] = top.astype(np.float64).mean(axis=1)
    return density


# ----------------------------------------------------------------------------- plots
def histogram_bins(
    values: Sequence[float] | np.ndarray, count: int = 40, log: Optional[bool] = None
) -> np.ndarray:
    """``count`` histogram edges from the smallest to the largest value.

    Temperatures are scales, so when they are positive and span a decade or more the edges are
    log-spaced (``log=None``, the default, decides so; ``True``/``False`` force it, ``True``
    only where the values are positive). Otherwise they are evenly spaced over the values' own
    range, not over the bounds the temperatures were allowed. Values that are all equal get a
    narrow range starting at the value.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        raise ValueError("no finite values to bin")
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + max(_DEGENERATE_WIDTH * abs(low), 1e-6)
    if log is None:
        log = low > 0 and high / low >= 10
    if log and low > 0:
        return np.geomspace(low, high, count)
    return np.linspace(low, high, count)


def is_log_spaced(bins: np.ndarray) -> bool:
    """Whether edges from :func:`histogram_bins` are log-spaced (so the axis should be too)."""
    if len(bins) < 3 or bins[0] <= 0:
        return False
    widths = np.diff(bins)
    return not np.allclose(widths, widths[0], rtol=1e-6)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Any, dpi: int = 110, tight: bool = True) -> None:
    """Writes ``fig`` to ``path`` (``tight_layout`` first unless ``tight=False``) and closes it."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def plot_distribution_by_group(
    ax: Any,
    groups: Mapping[str, Sequence[float] | np.ndarray],
    colors: Optional[Sequence[Any]] = None,
    count: int = 40,
    density: bool = False,
    histtype: str = "bar",
    log: Optional[bool] = None,
) -> Optional[np.ndarray]:
    """Histograms of temperatures on ``ax``, one per group, over the same bins.

    ``groups`` maps a legend label to that group's temperatures; empty groups are skipped.
    The bins come from :func:`histogram_bins` over all groups' values together, so the groups
    are comparable, and the x axis is logarithmic when the bins are. ``density=True`` normalises
    each group to unit area (groups of different sizes side by side); ``histtype="step"`` draws
    outlines that stay readable when groups overlap. The caller adds titles and the legend.

    Returns the bin edges, or None when every group is empty (nothing is drawn).
    """
    present = {label: np.asarray(v) for label, v in groups.items() if len(v)}
    if not present:
        return None
    bins = histogram_bins(np.concatenate(list(present.values())), count, log)
    palette = list(colors) if colors is not None else [None] * len(groups)
    color_of = dict(zip(groups, palette))
    for label, values in present.items():
        ax.hist(
            values,
            bins=bins,
            density=density,
            histtype=histtype,
            linewidth=1.5 if histtype == "step" else None,
            color=color_of.get(label),
            label=label,
        )
    if is_log_spaced(bins):
        ax.set_xscale("log")
    return bins


def plot_temperature_vs_density(
    ax: Any,
    density: Sequence[float] | np.ndarray,
    tau: Sequence[float] | np.ndarray,
    groups: Optional[Sequence[Any]] = None,
    max_points: int = 20000,
    seed: int = 0,
) -> tuple[float, float]:
    """Scatter of per-sample temperature against local density on ``ax``, with the Spearman
    correlation over samples (1,000 permutations) in the title; returns ``(rho, p)``.

    ``groups`` (one label per sample, e.g. class names) colours the points by group with a
    legend when there are at most 12 groups. At most ``max_points`` points (a seeded random
    subset) are drawn; the correlation uses every sample. The caller sets the x label.
    """
    density, tau = np.asarray(density, dtype=np.float64), np.asarray(tau, dtype=np.float64)
    rho, p_value = spearman(density, tau, permutations=1000, seed=seed)
    shown = np.arange(len(tau))
    if len(shown) > max_points:
        shown = np.sort(np.random.default_rng(seed).choice(len(tau), max_points, replace=False))
    if groups is not None:
        labels = np.asarray(groups)[shown]
        names = sorted(set(labels.tolist()), key=str)  # the same colour per group in every plot
        for name in names:
            mine = shown[labels == name]
            ax.scatter(density[mine], tau[mine], s=3, alpha=0.4, label=str(name))
        if len(names) <= 12:
            ax.legend(fontsize=6, markerscale=3, ncol=2)
    else:
        ax.scatter(density[shown], tau[shown], s=3, alpha=0.4)
    ax.set_ylabel("temperature")
    ax.set_title(f"Spearman over samples {rho:+.2f} (p {p_value:.3f})", fontsize=9)
    ax.grid(alpha=0.3)
    return rho, p_value


def plot_extremes_grid(
    path: Any,
    table: pd.DataFrame,
    images: Any,
    label: str = "class",
    title: Optional[str] = None,
    full_range: bool = False,
) -> None:
    """A grid of the images in ``table`` (from :func:`extremes`, with an ``index`` column into
    ``images``, uint8 (N, C, H, W)): the highest temperatures on the top row, the lowest on the
    bottom, each titled with its ``label`` column and tau. ``full_range`` shows grey images on
    0..255 rather than stretched to their own range."""
    plt = pyplot()
    ends = [(end, table[table["end"] == end]) for end in ("highest", "lowest")]
    cols = max(1, *(len(part) for _, part in ends))
    fig, axes = plt.subplots(2, cols, figsize=(1.6 * cols + 0.6, 4.2), squeeze=False)
    for row, (end, part) in enumerate(ends):
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(part):
                ax.axis("off")
                continue
            entry = part.iloc[col]
            image = images[int(entry["index"])].permute(1, 2, 0).numpy()
            if image.shape[2] == 1:
                limits = {"vmin": 0, "vmax": 255} if full_range else {}
                ax.imshow(image[:, :, 0], cmap="gray", **limits)
            else:
                ax.imshow(image)
            ax.set_title(f"{entry[label]}\ntau {entry['tau']:.3f}", fontsize=7)
            if col == 0:
                ax.set_ylabel(f"{end} tau", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
