"""The shared temperature analysis (``recipes/temperature_analysis.py``) and the long-tail
report's table and image grid of the training images at either end of the temperatures."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # recipes/ is run from the repository, not installed
    sys.path.insert(0, str(ROOT))

from recipes import temperature_analysis as ta  # noqa: E402


# ----------------------------------------------------------------------------- references
def _reference_ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks by definition: 1 + (number smaller) + (number equal - 1) / 2."""
    values = np.asarray(values, dtype=np.float64)
    ranks = np.empty(len(values))
    for i, v in enumerate(values):
        smaller = sum(1 for w in values if w < v)
        equal = sum(1 for w in values if w == v)
        ranks[i] = 1 + smaller + (equal - 1) / 2
    return ranks


def _reference_spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of the average ranks, with explicit sums."""
    rx, ry = _reference_ranks(x), _reference_ranks(y)
    dx, dy = rx - rx.mean(), ry - ry.mean()
    return float(np.sum(dx * dy) / math.sqrt(np.sum(dx * dx) * np.sum(dy * dy)))


# ----------------------------------------------------------------------------- Spearman
def test_average_ranks_match_the_definition_with_ties() -> None:
    assert ta.average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    rng = np.random.default_rng(0)
    values = rng.integers(0, 6, 40).astype(float)  # many ties
    np.testing.assert_array_equal(ta.average_ranks(values), _reference_ranks(values))


def test_spearman_against_a_loop_reference_on_tied_data() -> None:
    rng = np.random.default_rng(1)
    for n in (5, 17, 60):
        x = rng.integers(0, 4, n).astype(float)
        y = np.round(x + rng.normal(0, 1.5, n))  # correlated, with ties in both
        rho, p = ta.spearman(x, y, permutations=500)
        assert rho == pytest.approx(_reference_spearman(x, y), abs=1e-12)
        assert 1 / 501 <= p <= 1.0


def test_spearman_known_values_and_undefined_cases() -> None:
    rho, p = ta.spearman(range(12), range(12))
    assert rho == pytest.approx(1.0) and p == pytest.approx(1 / (ta.DEFAULT_PERMUTATIONS + 1))
    rho, p = ta.spearman(range(12), [math.exp(-v) for v in range(12)])  # monotone, decreasing
    assert rho == pytest.approx(-1.0) and p < 0.001
    # 1 - 6 * sum(d^2) / (n (n^2 - 1)) with d = (0, 1, 1, 1, 1): 1 - 24 / 120.
    assert ta.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])[0] == pytest.approx(0.8)
    assert math.isnan(ta.spearman([1, 2, 3], [4, 4, 4])[0])
    assert all(math.isnan(v) for v in ta.spearman([1, 2], [3, 4]))
    # NaN pairs are dropped; permutations=0 gives rho alone.
    rho, p = ta.spearman([1, 2, np.nan, 3, 4], [1, 2, 9, 3, 4], permutations=0)
    assert rho == pytest.approx(1.0) and math.isnan(p)


def test_spearman_p_value_is_seeded_and_independent_of_the_block_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=30), rng.normal(size=30)
    first = ta.spearman(x, y, permutations=300, seed=5)
    assert ta.spearman(x, y, permutations=300, seed=5) == first
    monkeypatch.setattr(ta, "_PERMUTATION_BLOCK", 30 * 7)  # 7 permutations per block
    assert ta.spearman(x, y, permutations=300, seed=5) == first


def test_spearman_p_value_approaches_the_exact_permutation_p() -> None:
    """For n = 6 every one of the 720 re-pairings can be counted: the exact two-sided p."""
    x, y = [1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5]
    rho = ta.spearman(x, y, permutations=0)[0]
    null = [ta.spearman(x, list(p), permutations=0)[0] for p in itertools.permutations(y)]
    exact = np.mean(np.abs(null) >= abs(rho) - 1e-12)
    assert 0.01 < exact < 0.2  # a p-value the sampling error below can be checked against
    assert ta.spearman(x, y)[1] == pytest.approx(exact, abs=0.01)  # 20000 draws: sd ~0.002


# ----------------------------------------------------------------------------- summaries
def test_quantiles_of_a_known_array() -> None:
    q = ta.quantiles(np.arange(11, dtype=float))  # 0..10: p10 is 1, p50 is 5, p90 is 9
    assert q == {"min": 0.0, "p10": 1.0, "p50": 5.0, "p90": 9.0, "max": 10.0, "mean": 5.0}
    assert ta.quantiles(np.array([])) == {}


def test_quantiles_are_the_cores_temperature_stats() -> None:
    """The recipes' quantiles (pandas, float64) and the core's training statistics agree."""
    from tau_core import temperature_stats

    values = np.random.default_rng(4).uniform(0.05, 1.0, 301)
    core = temperature_stats(torch.tensor(values), prefix="tau")
    for name, value in ta.quantiles(values).items():
        assert value == pytest.approx(float(core[f"tau_{name}"]), rel=1e-6)


def test_extremes_are_ordered_from_each_end() -> None:
    frame = pd.DataFrame({"name": list("abcdefg"), "tau": [0.3, 0.1, 0.7, np.nan, 0.5, 0.1, 0.9]})
    table = ta.extremes(frame, "tau", 2)
    assert list(table.columns) == ["end", "rank", "name", "tau"]
    highest, lowest = table[table["end"] == "highest"], table[table["end"] == "lowest"]
    assert highest["name"].tolist() == ["g", "c"] and highest["rank"].tolist() == [1, 2]
    # Equal values keep frame order at the low end; the NaN row is never listed.
    assert lowest["name"].tolist() == ["b", "f"] and lowest["tau"].tolist() == [0.1, 0.1]
    everything = ta.extremes(frame, "tau", 10)
    assert len(everything) == 12 and "d" not in set(everything["name"])


# ----------------------------------------------------------------------------- bins and plot
@pytest.mark.parametrize(
    "values, log",
    [
        (np.linspace(0.08, 0.12, 50), False),  # less than a decade: evenly spaced
        (np.geomspace(0.01, 1.0, 50), True),  # two decades: log-spaced
        (np.array([-1.0, 0.5, 2.0]), False),  # not positive: evenly spaced
        (np.full(5, 0.1), False),  # all equal: a narrow range from the value
    ],
)
def test_histogram_bins_cover_the_data(values: np.ndarray, log: bool) -> None:
    bins = ta.histogram_bins(values, 20)
    assert len(bins) == 20 and np.all(np.diff(bins) > 0)
    assert bins[0] <= values.min() and bins[-1] >= values.max()
    counts, _ = np.histogram(values, bins)
    assert counts.sum() == len(values)  # every value falls in some bin
    assert ta.is_log_spaced(bins) == log


def test_distribution_plot_draws_each_non_empty_group(tmp_path: Path) -> None:
    plt = ta.pyplot()
    fig, ax = plt.subplots()
    groups = {"head": np.geomspace(0.05, 0.9, 30), "middle": [], "tail": np.full(4, 0.2)}
    bins = ta.plot_distribution_by_group(ax, groups, colors=["b", "g", "r"], density=True)
    assert ax.get_legend_handles_labels()[1] == ["head", "tail"] and ax.get_xscale() == "log"
    # Colours follow the groups, the skipped one included: tail keeps its own (red).
    assert ax.containers[1].patches[0].get_facecolor()[:3] == (1.0, 0.0, 0.0)
    assert bins is not None and bins[0] == pytest.approx(0.05) and bins[-1] == pytest.approx(0.9)
    fig.savefig(tmp_path / "h.png")
    plt.close(fig)
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- long-tail report
def _tiny_long_tail_data(num_images: int = 14):
    from recipes.longtail.data import ImageSet, LongTailData

    counts = [7, 4, 3]
    targets = torch.tensor([c for c, n in enumerate(counts) for _ in range(n)])
    images = torch.randint(0, 256, (num_images, 1, 12, 12), dtype=torch.uint8)
    empty = ImageSet(images[:0], targets[:0])
    return LongTailData(
        name="synthetic",
        classes=["boot", "coat", "shirt"],
        train=ImageSet(images, targets),
        train_source_index=torch.arange(num_images),
        test=empty,
        probe=empty,
        class_counts=counts,
        class_rank=[0, 1, 2],
        class_group=["head", "middle", "tail"],
        mean=[0.5],
        std=[0.25],
        imbalance=7 / 3,
        class_order="natural",
        data_seed=0,
    )


def test_long_tail_extremes_grid_and_table(tmp_path: Path) -> None:
    from recipes.longtail import report

    data = _tiny_long_tail_data()
    tau = np.random.default_rng(3).uniform(0.05, 1.0, len(data.train)).tolist()
    path = tmp_path / "temperature_extremes.png"
    table = report.write_temperature_extremes(path, tau, data, seed=0, k=4)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    highest, lowest = table[table["end"] == "highest"], table[table["end"] == "lowest"]
    assert highest["tau"].tolist() == sorted(tau, reverse=True)[:4]
    assert lowest["tau"].tolist() == sorted(tau)[:4]
    # Each row describes the image it names.
    for _, row in table.iterrows():
        index = int(row["index"])
        assert row["tau"] == tau[index]
        klass = int(data.train.targets[index])
        assert (row["class_name"], row["class_count"], row["group"]) == (
            data.classes[klass],
            data.class_counts[klass],
            data.class_group[klass],
        )
    # The report's Markdown table of them: one line per image, ends and temperatures as listed.
    lines = report.sample_tables(table, None)["extremes"].splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["end", "rank", "index", "class", "class size", "group", "tau"]
    assert [c[0] for c in cells[2:]] == ["highest"] * 4 + ["lowest"] * 4
    assert [c[6] for c in cells[2:]] == [f"{t:.4f}" for t in table["tau"]]
    with pytest.raises(ValueError, match="training-set order"):
        report.temperature_extremes(tau[:-1], data)


# ----------------------------------------------------------------------------- local density
def _reference_density(features: np.ndarray, k: int) -> np.ndarray:
    """Mean of the k largest cosine similarities to other samples, one sample at a time."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    out = []
    for i in range(len(x)):
        sims = sorted((float(x[i] @ x[j]) for j in range(len(x)) if j != i), reverse=True)
        out.append(np.mean(sims[:k]))
    return np.array(out)


@pytest.mark.parametrize("k, chunk", [(1, 1024), (3, 4), (10, 7)])
def test_knn_density_matches_a_direct_computation(k: int, chunk: int) -> None:
    features = np.random.default_rng(k).normal(size=(23, 5)) * np.arange(1, 24)[:, None]
    density = ta.knn_density(features, k=k, chunk=chunk)
    np.testing.assert_allclose(density, _reference_density(features, k), atol=1e-6)


def test_knn_density_of_a_cluster_and_an_outlier() -> None:
    # Two identical points are each other's nearest neighbour (cosine 1); the orthogonal one
    # has only neighbours at cosine 0. A sample is never its own neighbour.
    assert ta.knn_density([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]], k=1).tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"k must be in \[1, 2\]"):
        ta.knn_density(np.eye(3), k=3)
    with pytest.raises(ValueError, match="2-D"):
        ta.knn_density(np.ones(4), k=1)


def test_temperature_vs_density_plot_reports_the_spearman_over_samples(tmp_path: Path) -> None:
    plt = ta.pyplot()
    rng = np.random.default_rng(0)
    density = rng.uniform(size=300)
    tau = 0.1 + 0.5 * density + 0.05 * rng.normal(size=300)
    fig, ax = plt.subplots()
    rho, p = ta.plot_temperature_vs_density(ax, density, tau, groups=["a", "b", "c"] * 100)
    assert rho == pytest.approx(_reference_spearman(density, tau), abs=1e-12)
    assert p == pytest.approx(1 / 1001) and f"{rho:+.2f}" in ax.get_title()
    assert len(ax.collections) == 3
    fig.savefig(tmp_path / "d.png")
    plt.close(fig)


# ----------------------------------------------------------------------------- command lines
def _options_example(
    checkpoint: Path, key_index: Path, top: int = 20, tau_range: tuple[float, float] | None = None
) -> None:
    """An example command.

    Args:
        checkpoint: the checkpoint
        key_index: the key index
        top: captions at each end
        tau_range: the temperature range
    """


def test_options_come_from_the_signature_with_dashed_names(capsys) -> None:
    from recipes.cli_args import function_arguments, function_parser

    def parse(argv: list[str]) -> dict:
        parser = function_parser(_options_example, prog="example")
        return function_arguments(parser, _options_example, argv)[1]

    argv = ["--checkpoint", "a.pt", "--key-index", "k.txt", "--tau-range", "0.01", "0.1"]
    assert parse(argv) == {
        "checkpoint": Path("a.pt"),
        "key_index": Path("k.txt"),
        "top": 20,
        "tau_range": (0.01, 0.1),
    }
    with pytest.raises(SystemExit):
        parse(["--help"])
    help_text = capsys.readouterr().out
    assert "--key-index KEY_INDEX" in help_text and "captions at each end" in help_text
    assert "--key_index" not in help_text and "An example command." in help_text
    with pytest.raises(SystemExit) as exit_info:  # a required option missing
        parse(["--checkpoint", "a.pt"])
    assert exit_info.value.code == 2
    assert "--key-index" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # not an int
        parse(argv + ["--top", "many"])
    with pytest.raises(SystemExit):  # a range is two numbers
        parse(argv[:-1])
