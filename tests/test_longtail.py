"""The long-tailed comparison (``python -m recipes.longtail``): the whole job on a tiny budget,
its bad-option errors, and the pieces it is built from (long-tail profile, Spearman, views)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # recipes/ is run from the repository, not installed
    sys.path.insert(0, str(ROOT))

from lightly_tau import IndexedDataset  # noqa: E402
from recipes.longtail import run as longtail_run  # noqa: E402
from recipes.longtail.augment import AugmentSettings, BatchSimCLRAugment  # noqa: E402
from recipes.longtail.claim import (  # noqa: E402
    ClaimRun,
    claim_verdict,
    density_analysis,
)
from recipes.longtail.data import (  # noqa: E402
    frequency_groups,
    load_long_tail_data,
    long_tail_counts,
    long_tail_indices,
)
from recipes.longtail.evaluate import (  # noqa: E402
    extract_features,
    group_accuracy,
    knn_predictions,
    linear_probe_predictions,
    per_class_accuracy,
    raw_pixel_features,
    spearman,
)
from recipes.longtail.models import SimCLRModel  # noqa: E402
from recipes.longtail.presets import PRESET_CLASSES, PRESETS  # noqa: E402
from recipes.longtail.train import (  # noqa: E402
    LOSS_REGISTRY,
    LossSettings,
    TemperatureLoss,
)
from recipes.temperature_analysis import knn_density  # noqa: E402

LOSSES = ["ntxent", "macl", "isogclr", "dystress"]
SEEDS = [0, 1]
TINY = [
    "--dataset",
    "fashion-mnist",
    "--max-per-class",
    "48",
    "--imbalance",
    "6",
    "--test-per-class",
    "12",
    "--probe-per-class",
    "10",
    "--epochs",
    "2",
    "--batch-size",
    "32",
    "--probe-epochs",
    "5",
    "--knn-k",
    "5",
    "--parallel-runs",
    "1",
    "--threads",
    "1",
    "--no-progress",
    "--isogclr-eta",
    "0.5",
]
PLOTS = [
    "accuracy_by_group.png",
    "training_curves.png",
    "temperature_by_class.png",
    "temperature_histogram.png",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def job(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs the whole job once in this process: 3 losses x 2 seeds, 2 epochs, tiny data."""
    output = tmp_path_factory.mktemp("report")
    argv = TINY + ["--data-root", str(data_root), "--output", str(output)]
    argv += ["--losses", *LOSSES, "--seeds", *map(str, SEEDS)]
    threads = torch.get_num_threads()
    try:
        status = longtail_run.main(argv)
    finally:
        torch.set_num_threads(threads)
    with open(output / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    with open(output / "summary.csv") as handle:
        summary = list(csv.DictReader(handle))
    document = json.loads((output / "results.json").read_text())
    return {
        "status": status,
        "output": output,
        "argv": argv,
        "rows": rows,
        "summary": summary,
        "json": document,
    }


def _float(value: str) -> float:
    return float(value) if value not in ("", "nan") else math.nan


@pytest.mark.slow
def test_job_writes_every_file(job: dict) -> None:
    output = job["output"]
    assert job["status"] == 0
    for name in ["report.md", "results.csv", "summary.csv", "results.json"] + PLOTS:
        path = output / name
        assert path.is_file() and path.stat().st_size > 0, name
    for name in PLOTS:
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for loss in LOSSES:
        for seed in SEEDS:
            assert (output / "checkpoints" / f"{loss}_seed{seed}.pt").is_file()
    report = (output / "report.md").read_text()
    for name in PLOTS:
        assert f"]({name})" in report
    assert "What this run can and cannot show" in report
    assert "Seeds: 0 1" in report


@pytest.mark.slow
def test_one_row_per_run_and_per_loss(job: dict) -> None:
    rows, summary = job["rows"], job["summary"]
    assert [(r["loss"], int(r["seed"])) for r in rows] == [
        (loss, s) for s in SEEDS for loss in LOSSES
    ]
    assert [r["loss"] for r in summary] == LOSSES
    assert all(int(r["seeds"]) == len(SEEDS) for r in summary)
    assert all(int(r["epochs"]) == 2 for r in rows)


@pytest.mark.slow
def test_accuracies_are_fractions_from_the_run(job: dict) -> None:
    rows, document = job["rows"], job["json"]
    for row, run in zip(rows, document["runs"]):
        assert (row["loss"], int(row["seed"])) == (run["loss"], run["seed"])
        for kind in ("knn", "probe"):
            for group in ("all", "head", "middle", "tail"):
                value = _float(row[f"{kind}_{group}"])
                assert 0.0 <= value <= 1.0
                assert value == pytest.approx(run["evaluation"][kind][group], abs=1e-12)
            # Overall accuracy is the mean of the per-class accuracies on the balanced test set.
            per_class = run["evaluation"][f"{kind}_per_class"]
            assert _float(row[f"{kind}_all"]) == pytest.approx(np.mean(per_class), abs=1e-12)
    # The summary is the mean over seeds of the per-run rows.
    for entry in job["summary"]:
        mine = [_float(r["knn_all"]) for r in rows if r["loss"] == entry["loss"]]
        assert _float(entry["knn_all_mean"]) == pytest.approx(np.mean(mine), abs=1e-12)
        assert _float(entry["knn_all_std"]) == pytest.approx(np.std(mine, ddof=1), abs=1e-12)


@pytest.mark.slow
def test_numbers_differ_between_losses_and_seeds(job: dict) -> None:
    rows = job["rows"]
    final_losses = {(r["loss"], int(r["seed"])): _float(r["final_loss"]) for r in rows}
    assert len(set(final_losses.values())) == len(final_losses)
    runs = job["json"]["runs"]
    for loss in LOSSES:
        first, second = [r for r in runs if r["loss"] == loss]
        assert first["history"][0]["loss_mean"] != second["history"][0]["loss_mean"]


@pytest.mark.slow
def test_temperatures_stay_within_their_bounds(job: dict) -> None:
    for row in job["rows"]:
        low, high = _float(row["tau_bound_low"]), _float(row["tau_bound_high"])
        assert low - 1e-6 <= _float(row["tau_min"]) <= _float(row["tau_mean"]) + 1e-6
        assert _float(row["tau_mean"]) <= _float(row["tau_max"]) + 1e-6 <= high + 2e-6
        if row["loss"] == "ntxent":
            assert (low, high) == (0.1, 0.1)
        if row["loss"] == "dystress":
            assert (low, high) == (0.07, 0.2)
        if row["loss"] == "macl":  # tau_0 (1 + alpha (A - A_0)), A in [-1, 1]
            assert (low, high) == pytest.approx((0.05, 0.15))
    for run in job["json"]["runs"]:
        assert len(run["history"]) == 2
        if run["loss"] != "isogclr":
            assert run["temperatures"] is None
            continue
        assert run["temperature_bounds"] == [0.05, 1.0]
        temperatures = run["temperatures"]
        assert 0.05 - 1e-6 <= temperatures["min"] < temperatures["max"] <= 1.0 + 1e-6
        for entry in temperatures["per_class"]:
            assert 0.05 - 1e-6 <= entry["p10"] <= entry["mean"] <= entry["p90"] <= 1.0 + 1e-6
        # The correlation is tracked after every epoch, not only at the end.
        for record in run["history"]:
            assert -1.0 <= record["spearman"] <= 1.0
            assert len(record["tau_class_mean"]) == 10
        assert run["history"][-1]["spearman"] == pytest.approx(temperatures["spearman"])


@pytest.mark.slow
def test_report_numbers_match_the_saved_models(job: dict, data_root: Path) -> None:
    """Reload a checkpoint, recompute kNN accuracy and temperatures: the table must agree."""
    document, output = job["json"], job["output"]
    data = load_long_tail_data(
        "fashion-mnist",
        data_root,
        imbalance=6,
        max_per_class=48,
        test_per_class=12,
        probe_per_class=10,
    )
    assert len(data.train) == document["data"]["train_size"]
    train_config = document["config"]["train"]
    for loss in ("ntxent", "isogclr"):
        run = next(r for r in document["runs"] if r["loss"] == loss and r["seed"] == 1)
        checkpoint = torch.load(output / "checkpoints" / f"{loss}_seed1.pt", weights_only=False)
        assert torch.equal(checkpoint["train_source_index"], data.train_source_index)
        model = SimCLRModel(train_config["backbone"], 1, 28, 512, 128)
        model.load_state_dict(checkpoint["model"])
        dtype = torch.bfloat16 if train_config["precision"] == "bf16" else None
        features = [
            extract_features(model, split, data.mean, data.std, torch.device("cpu"), 512, dtype)
            for split in (data.train, data.test)
        ]
        predictions = knn_predictions(features[0], data.train.targets, features[1], 10, k=5)
        accuracy = per_class_accuracy(predictions, data.test.targets, 10)
        assert accuracy.tolist() == pytest.approx(run["evaluation"]["knn_per_class"], abs=1e-9)
        if loss == "isogclr":
            tau = checkpoint["loss"]["state.tau"]
            assert float(tau.mean()) == pytest.approx(run["temperatures"]["mean"], rel=1e-6)
            assert float(tau.min()) == pytest.approx(run["temperatures"]["min"], rel=1e-6)
            for entry in run["temperatures"]["per_class"]:
                mean = float(tau[data.train.targets == entry["class"]].mean())
                assert mean == pytest.approx(entry["mean"], rel=1e-6)


# --------------------------------------------------------------------------- the claim
CLAIM = [("natural", s) for s in SEEDS] + [("permuted", s) for s in SEEDS]


@pytest.mark.slow
def test_claim_runs_cover_every_seed_and_class_order(job: dict) -> None:
    """iSogCLR for each seed under both class orders; the comparison's natural-order runs are
    reused, the permuted ones trained on their own data; one verdict over all four."""
    output, document = job["output"], job["json"]
    with open(output / "claim.csv") as handle:
        claim = list(csv.DictReader(handle))
    assert [(r["class_order"], int(r["seed"])) for r in claim] == CLAIM
    for row in claim:
        assert int(row["epochs"]) == 2
        if row["class_order"] == "natural":
            same = next(
                r for r in job["rows"] if r["loss"] == "isogclr" and r["seed"] == row["seed"]
            )
            assert _float(row["spearman_final"]) == pytest.approx(_float(same["spearman_final"]))
        else:
            name = f"isogclr_permuted_data0_seed{row['seed']}.pt"
            assert (output / "checkpoints" / name).is_file()
        holds = _float(row["spearman_final"]) > 0 and _float(row["p_value_final"]) < 0.05
        assert (row["holds"] == "True") == holds
    verdict = document["claim"]["verdict"]
    held = sum(r["holds"] == "True" for r in claim)
    assert verdict["holds"] == held and verdict["runs"] == 4
    assert verdict["kind"] == ("none" if held == 0 else "all" if held == 4 else "some")
    report = (output / "report.md").read_text()
    assert f"**Verdict: {verdict['text']}**" in report
    for name in ("claim_spearman.png", "temperature_vs_density.png"):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in report


@pytest.mark.slow
def test_per_sample_densities_match_the_saved_models(job: dict, data_root: Path) -> None:
    """A permuted-order claim run: its temperatures, learned-feature and pixel densities in
    per_sample.csv are recomputed from its checkpoint and data."""
    output, document = job["output"], job["json"]
    data = load_long_tail_data(
        "fashion-mnist",
        data_root,
        imbalance=6,
        class_order="permuted",
        max_per_class=48,
        test_per_class=12,
        probe_per_class=10,
    )
    checkpoint = torch.load(
        output / "checkpoints" / "isogclr_permuted_data0_seed1.pt", weights_only=False
    )
    assert torch.equal(checkpoint["train_source_index"], data.train_source_index)
    with open(output / "per_sample.csv") as handle:
        rows = [
            r for r in csv.DictReader(handle) if (r["class_order"], r["seed"]) == ("permuted", "1")
        ]
    assert [int(r["index"]) for r in rows] == list(range(len(data.train)))
    tau = checkpoint["loss"]["state.tau"].double().numpy()
    np.testing.assert_allclose([float(r["tau"]) for r in rows], tau, rtol=1e-5)
    sizes = [data.class_counts[c] for c in data.train.targets.tolist()]
    assert [int(float(r["class_size"])) for r in rows] == sizes
    assert [r["class"] for r in rows] == [data.classes[c] for c in data.train.targets.tolist()]
    model = SimCLRModel(document["config"]["train"]["backbone"], 1, 28, 512, 128)
    model.load_state_dict(checkpoint["model"])
    dtype = torch.bfloat16 if document["config"]["train"]["precision"] == "bf16" else None
    features = extract_features(
        model, data.train, data.mean, data.std, torch.device("cpu"), 512, dtype
    )
    feature = knn_density(features.numpy(), 20)
    np.testing.assert_allclose([float(r["feature_density"]) for r in rows], feature, rtol=1e-5)
    pixel = knn_density(raw_pixel_features(data.train).numpy(), 20)
    np.testing.assert_allclose([float(r["pixel_density"]) for r in rows], pixel, rtol=1e-5)
    with open(output / "claim.csv") as handle:
        claim = next(
            r for r in csv.DictReader(handle) if (r["class_order"], r["seed"]) == ("permuted", "1")
        )
    assert _float(claim["rho_tau_feature_density"]) == pytest.approx(
        spearman(feature, tau, permutations=0)[0], abs=1e-9
    )
    assert _float(claim["rho_tau_class_size"]) == pytest.approx(
        spearman(sizes, tau, permutations=0)[0], abs=1e-9
    )


def _claim_run(rho: float, p: float, order: str = "natural", seed: int = 0) -> ClaimRun:
    return ClaimRun(order, 0, seed, spearman=[-0.5, rho], p_values=[0.01, p])


def test_claim_verdict_all_some_none() -> None:
    held = _claim_run(0.75, 0.018)
    assert held.holds() and not _claim_run(0.75, 0.05).holds()
    # A significant negative correlation is the opposite of the claim, not support for it.
    assert not _claim_run(-0.9, 0.001).holds()
    verdict = claim_verdict([held, _claim_run(0.8, 0.01, "permuted", 1)])
    assert (verdict["kind"], verdict["holds"], verdict["runs"]) == ("all", 2, 2)
    assert verdict["text"].startswith("The claim holds in all 2 runs")
    verdict = claim_verdict([held, _claim_run(0.24, 0.52, "permuted"), _claim_run(-0.9, 0.001)])
    assert (verdict["kind"], verdict["holds"]) == ("some", 1)
    assert verdict["supporting"] == ["natural order (data seed 0), seed 0"]
    assert "1 of 3 runs" in verdict["text"] and "+0.24 (p 0.520)" in verdict["text"]
    verdict = claim_verdict([_claim_run(0.24, 0.52), _claim_run(0.36, 0.32)])
    assert verdict["kind"] == "none" and "none of the 2 runs" in verdict["text"]
    assert claim_verdict([])["kind"] == "none"
    with pytest.raises(ValueError, match="alpha"):
        claim_verdict([held], alpha=1.5)


def test_density_analysis_names_the_strongest_predictor() -> None:
    rng = np.random.default_rng(0)
    n = 400
    density = rng.uniform(size=n)
    run = ClaimRun(
        "permuted",
        0,
        0,
        [0.1],
        [0.5],
        tau=density + 0.05 * rng.normal(size=n),
        class_size=rng.integers(10, 100, size=n).astype(float),
        feature_density=rng.uniform(size=n),
        pixel_density=density,
    )
    analysis = density_analysis(run)
    assert analysis["best"] == "pixel_density" and analysis["samples"] == n
    assert analysis["pixel_density"]["rho"] == pytest.approx(
        spearman(density, run.tau, permutations=0)[0]
    )
    assert analysis["pixel_density"]["p_value"] == pytest.approx(1 / 1001)
    assert abs(analysis["class_size"]["rho"]) < 0.2
    with pytest.raises(ValueError, match="feature_density has 3 values"):
        density_analysis(
            ClaimRun("natural", 0, 0, [], [], tau=np.ones(4), feature_density=np.ones(3))
        )


def test_every_registered_loss_reports_its_temperature_within_bounds() -> None:
    settings = LossSettings(embedding_dim=8)
    torch.manual_seed(0)
    z0, z1 = torch.randn(16, 8), torch.randn(16, 8)
    z1 = z0 + 0.5 * z1  # some alignment
    for name, spec in LOSS_REGISTRY.items():
        loss = TemperatureLoss(name, settings, num_samples=32)
        value = loss(z0, z1, torch.arange(16))
        assert torch.isfinite(value), name
        low, high = settings.temperature_bounds(name)
        assert low - 1e-6 <= float(loss.tau_batch) <= high + 1e-6, name
        assert (loss.sample_temperatures() is not None) == spec.per_sample
    # MACL: tau_0 (1 + alpha (A - A_0)), A the mean positive similarity as Lightly computes it.
    macl = TemperatureLoss("macl", LossSettings(macl_alpha=0.8, macl_a0=0.2), num_samples=32)
    macl(z0, z1, torch.arange(16))
    out = torch.nn.functional.normalize(torch.cat([z0, z1]), dim=1)
    cov = out @ out.T
    alignment = torch.cat([torch.diag(cov, 16), torch.diag(cov, -16)]).mean()
    assert float(macl.tau_batch) == pytest.approx(0.1 * (1 + 0.8 * (float(alignment) - 0.2)))


# --------------------------------------------------------------------------- bad options
@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []
    monkeypatch.setattr(longtail_run, "train_and_evaluate", lambda *a, **k: calls.append(a))
    return calls


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--imbalance", "0.5"], "--imbalance must be >= 1"),
        (["--losses", "ntxent", "infonce"], "--losses element 2"),
        (["--epochs", "0"], "--epochs:\n  Not of type PositiveInt"),
        (["--isogclr-tau-min", "2.0"], "tau_min (2) must not exceed tau_max (1)"),
        (["--dataset", "folder"], "--dataset folder needs exactly one PATH"),
        (["--dataset", "folder", "/no/such/folder"], "is not a directory"),
        (["--max-per-class", "48", "--imbalance", "100"], "rarest class would keep no image"),
        (["--max-per-class", "20", "--imbalance", "2", "--batch-size", "256"], "is larger than"),
    ],
)
def test_bad_options_exit_before_training(
    extra: list, message: str, data_root: Path, tmp_path: Path, no_training: list, capsys
) -> None:
    argv = ["--data-root", str(data_root), "--output", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        longtail_run.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert no_training == []


def test_unwritable_output_and_missing_dataset(tmp_path: Path, no_training: list, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        longtail_run.main(["--output", str(blocker / "report")])
    assert exit_info.value.code == 2
    assert f"--output {blocker / 'report'} cannot be written" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--dataset", "mnist", "--data-root", str(empty), "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        longtail_run.main(argv)
    assert exit_info.value.code == 2
    assert "mnist not found under" in capsys.readouterr().err
    assert no_training == []


# --------------------------------------------------------------------------- building blocks
def test_long_tail_profile_matches_cifar_lt() -> None:
    # CIFAR-10-LT and CIFAR-100-LT at imbalance 100 have 12,406 and 10,847 training images.
    counts = long_tail_counts(5000, 10, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(long_tail_counts(500, 100, 100)) == 10847
    assert long_tail_counts(7, 3, 1) == [7, 7, 7]
    with pytest.raises(ValueError, match="imbalance must be >= 1"):
        long_tail_counts(100, 10, 0.9)
    assert frequency_groups(list(range(10))) == ["head"] * 4 + ["middle"] * 3 + ["tail"] * 3


def test_image_folder_is_read_resized_and_subsampled(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 20), ("val", 4)):
        for name in ("ant", "bee", "cat"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.png")
    data = load_long_tail_data(
        "folder", tmp_path, folder=tmp_path, imbalance=4, image_size=16, probe_per_class=5
    )
    assert data.classes == ["ant", "bee", "cat"]
    assert data.class_counts == [20, 10, 5] and data.class_group == ["head", "middle", "tail"]
    assert data.train.images.shape == (35, 3, 16, 16) and data.train.images.dtype == torch.uint8
    assert torch.bincount(data.train.targets).tolist() == [20, 10, 5]
    assert torch.bincount(data.test.targets).tolist() == [4, 4, 4]
    assert torch.bincount(data.probe.targets).tolist() == [5, 5, 5]


def test_permuted_class_order_follows_the_seed() -> None:
    targets = torch.arange(10).repeat_interleave(100)
    index, counts, ranks = long_tail_indices(targets, 10, 10, "natural", seed=0)
    assert counts == long_tail_counts(100, 10, 10) and ranks == list(range(10))
    assert torch.bincount(targets[index], minlength=10).tolist() == counts
    _, counts_a, ranks_a = long_tail_indices(targets, 10, 10, "permuted", seed=3)
    _, counts_b, ranks_b = long_tail_indices(targets, 10, 10, "permuted", seed=3)
    _, _, ranks_c = long_tail_indices(targets, 10, 10, "permuted", seed=4)
    assert ranks_a == ranks_b and ranks_a != ranks_c and sorted(ranks_a) == list(range(10))
    assert [counts_a[c] for c in sorted(range(10), key=lambda c: ranks_a[c])] == counts


def test_cosine_schedule_is_kukleva_et_al() -> None:
    # tau(e) = tau_lo + (tau_hi - tau_lo) / 2 * (1 + cos(2 pi e / T)), T the period in epochs.
    settings = LossSettings(cosine_tau_min=0.1, cosine_tau_max=1.0, cosine_period_epochs=3.0)
    loss = TemperatureLoss("ntxent-cosine", settings, num_samples=10)
    steps_per_epoch, max_steps = 40, 600
    for step in (0, 7, 60, 119, 120, 333, 599):
        epoch = step / steps_per_epoch
        expected = 0.1 + 0.45 * (1 + math.cos(2 * math.pi * epoch / 3.0))
        loss.before_step(step, steps_per_epoch, max_steps)
        assert loss.loss.temperature == pytest.approx(expected)
    z0, z1 = torch.randn(6, 8), torch.randn(6, 8)
    loss(z0, z1, torch.arange(6))
    assert float(loss.tau_batch) == pytest.approx(loss.loss.temperature)


def test_per_class_accuracy_against_a_loop_and_the_probe_on_separable_features() -> None:
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 4, (200,), generator=g)  # class 4 of 5 has no test image
    predictions = torch.where(
        torch.rand(200, generator=g) < 0.6, targets, torch.randint(0, 5, (200,), generator=g)
    )
    accuracy = per_class_accuracy(predictions, targets, 5)
    for c in range(4):
        members = targets == c
        assert accuracy[c].item() == float((predictions[members] == c).double().mean())
    assert torch.isnan(accuracy[4]) and accuracy.dtype == torch.float64
    groups = group_accuracy(accuracy, ["head", "head", "middle", "tail", "tail"])
    assert groups["all"] == pytest.approx(float(accuracy[:4].mean()))
    assert groups["tail"] == accuracy[3].item() and groups["middle"] == accuracy[2].item()
    # Classes in separate corners of feature space: the probe gets every test point right.
    centres = 10.0 * torch.eye(3, 8)
    train_targets, test_targets = torch.arange(60) % 3, torch.arange(30) % 3
    train = centres[train_targets] + torch.randn(60, 8, generator=g)
    test = centres[test_targets] + torch.randn(30, 8, generator=g)
    assert torch.equal(linear_probe_predictions(train, train_targets, test), test_targets)


def test_spearman_against_hand_computed_ranks() -> None:
    rho, p_value = spearman(range(10), range(10))
    assert rho == pytest.approx(1.0) and p_value < 0.001
    assert spearman(range(10), range(10, 0, -1))[0] == pytest.approx(-1.0)
    # y has a tie: ranks [1, 2, 3.5, 5, 3.5]; Pearson correlation of the ranks.
    x_ranks, y_ranks = np.arange(1, 6.0), np.array([1, 2, 3.5, 5, 3.5])
    expected = np.corrcoef(x_ranks, y_ranks)[0, 1]
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])[0] == pytest.approx(expected)
    assert math.isnan(spearman([1, 2, 3], [4, 4, 4])[0])


def test_batched_views_are_random_per_image_and_normalised() -> None:
    torch.manual_seed(0)
    settings = AugmentSettings.for_dataset("cifar10", 32, 3)
    augment = BatchSimCLRAugment(settings, [0.5] * 3, [0.25] * 3)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    first, second = augment(images), augment(images)
    assert first.shape == (16, 3, 32, 32) and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert not torch.allclose(first, second)
    # Values are normalised pixels: within [(0 - 0.5) / 0.25, (1 - 0.5) / 0.25].
    assert first.min() >= -2.0 - 1e-5 and first.max() <= 2.0 + 1e-5
    # A folder dataset adds Gaussian blur; grey images get no colour jitter.
    blur = BatchSimCLRAugment(AugmentSettings.for_dataset("folder", 24, 3), [0.5] * 3, [0.25] * 3)
    assert blur(images[:, :, :24, :24]).shape == (16, 3, 24, 24)
    grey = AugmentSettings.for_dataset("mnist", 28, 1)
    assert (grey.cj_sat, grey.cj_hue, grey.hf_prob, grey.min_scale) == (0.0, 0.0, 0.0, 0.2)


def test_indexed_subset_keeps_the_index_in_batches() -> None:
    # DataLoader fetches through Subset.__getitems__; IndexedDataset must not forward it.
    base = TensorDataset(torch.arange(10.0), torch.arange(10))
    loader = DataLoader(IndexedDataset(Subset(base, [5, 6, 7, 8])), batch_size=4)
    values, targets, index = next(iter(loader))
    assert index.tolist() == [0, 1, 2, 3] and targets.tolist() == [5, 6, 7, 8]


# ------------------------------------------------------------------- presets and smoke mode
def _smoke(preset: str, output: Path, data_root: Path, extra: Sequence[str] = ()) -> dict:
    argv = ["--preset", preset, "--smoke", "--losses", "isogclr", "--output", str(output)]
    argv += ["--data-root", str(data_root), "--no-progress", *extra]
    return argv


def _changed_temperatures(output: Path, document: dict) -> int:
    """Learned temperatures in the saved iSogCLR state that left tau_init."""
    saved = torch.load(output / "checkpoints" / "isogclr_seed0.pt", weights_only=False)
    init = document["config"]["loss"]["isogclr_tau_init"]
    return int((saved["loss"]["state.tau"] != torch.tensor(init)).sum())


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_smoke_mode_runs_the_published_setting(
    preset: str, data_root: Path, tmp_path: Path
) -> None:
    """Each preset's smoke mode: the preset's model, optimizer, loss settings and class count on
    a Fashion-MNIST stand-in, two steps, then the whole report."""
    output = tmp_path / preset
    argv = _smoke(preset, output, data_root, ["--parallel-runs", "1", "--threads", "1"])
    threads = torch.get_num_threads()
    try:
        assert longtail_run.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    document = json.loads((output / "results.json").read_text())
    config, data = document["config"], document["data"]
    assert config["preset"] == preset and config["smoke"]
    train = config["train"]
    assert (train["backbone"], train["optimizer"], train["lr"]) == ("resnet18", "lars", 0.8)
    assert (train["epochs"], train["steps_per_epoch"], train["batch_size"]) == (1, 2, 16)
    published = PRESETS[preset]
    for name in ("isogclr_rho", "isogclr_eta", "isogclr_beta", "isogclr_gamma", "dystress_tau_min"):
        assert config["loss"][name] == published[name]
    assert data["num_classes"] == PRESET_CLASSES[preset]
    assert any("stand" in note.lower() for note in data["notes"]) or preset == "imagenet100-lt"
    if preset == "imagenet100-lt":  # read back through --dataset folder at the smoke size
        assert data["name"] == "folder" and data["image_size"] == 80
        assert (output / "smoke-data" / "imagenet100-standin" / "val").is_dir()
    else:
        assert data["name"] == preset.removesuffix("-lt") and data["image_size"] == 32
    # Two steps of 16 distinct images each: exactly 32 learned temperatures have moved.
    assert _changed_temperatures(output, document) == 32
    for name in PLOTS + ["report.md", "checkpoints/isogclr_seed0.pt"]:
        assert (output / name).stat().st_size > 0


@pytest.mark.slow
def test_smoke_mode_under_lightning_ddp_gathers_state_from_both_processes(
    data_root: Path, tmp_path: Path
) -> None:
    """``--devices 2`` on CPU: Lightning's DDP (gloo) re-runs the command per process; the main
    process's state holds the temperatures of both processes' samples (2 x 2 steps x 16)."""
    output = tmp_path / "ddp"
    argv = _smoke("cifar10-lt", output, data_root, ["--devices", "2", "--threads", "1"])
    result = subprocess.run(
        [sys.executable, "-m", "recipes.longtail", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads((output / "results.json").read_text())
    assert document["config"]["train"]["devices"] == 2
    assert document["config"]["train"]["strategy"] == "ddp"
    assert _changed_temperatures(output, document) == 64


def test_preset_options_given_on_the_command_line_win(tmp_path: Path) -> None:
    argv = ["--preset", "cifar100-lt", "--lr", "0.5", "--output", str(tmp_path)]
    _, args = longtail_run.parse_options(argv)
    assert (args.lr, args.optimizer, args.dataset, args.epochs) == (0.5, "lars", ["cifar100"], 400)
    _, args = longtail_run.parse_options(argv + ["--smoke", "--epochs", "3"])
    assert (args.lr, args.epochs, args.steps_per_epoch, args.batch_size) == (0.5, 3, 2, 16)


def test_imagenet100_preset_needs_a_folder(tmp_path: Path, no_training: list, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        longtail_run.main(["--preset", "imagenet100-lt", "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--dataset folder PATH" in capsys.readouterr().err


@pytest.mark.slow
def test_trained_temperatures_are_stepped_by_their_own_optimizer(
    data_root: Path, tmp_path: Path
) -> None:
    """RGCL-g's global temperature and TempNet's network move during the recipe's training."""
    argv = TINY + ["--data-root", str(data_root), "--output", str(tmp_path / "report")]
    argv += ["--losses", "rgclg", "tempnet", "--seeds", "0", "--claim-seeds"]
    threads = torch.get_num_threads()
    try:
        assert longtail_run.main(argv) in (0, None)
    finally:
        torch.set_num_threads(threads)
    runs = {
        r["loss"]: r for r in json.loads((tmp_path / "report" / "results.json").read_text())["runs"]
    }
    rgclg = runs["rgclg"]["history"]
    assert rgclg[0]["tau_low"] == pytest.approx(0.1, abs=1e-6)  # tau_init, first step
    assert abs(rgclg[-1]["tau_mean"] - 0.1) > 1e-5  # its AdamW moved it
    tempnet = runs["tempnet"]["history"]
    assert tempnet[0]["tau_mean"] != tempnet[-1]["tau_mean"]
    assert all(0.05 <= h["tau_low"] <= h["tau_high"] <= 0.5 for h in tempnet)


def test_generated_parser_keeps_every_flag_default_and_choice() -> None:
    """The flags the main job, the presets and the docs use, as the hand-written parser had them."""
    from recipes.longtail.cli import build_parser
    from recipes.longtail.names import DEFAULT_LOSSES

    parser = build_parser()
    actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    defaults = {
        "--dataset": ["fashion-mnist"],
        "--data-root": Path("data"),
        "--imbalance": 100.0,
        "--class-order": "natural",
        "--data-seed": 0,
        "--max-per-class": None,
        "--probe-per-class": 500,
        "--losses": list(DEFAULT_LOSSES),
        "--seeds": [0],
        "--epochs": 9,
        "--claim-seeds": [0, 1],
        "--claim-orders": ["natural", "permuted"],
        "--batch-size": 256,
        "--output": Path("runs") / "longtail",
        "--backbone": "convnet",
        "--hidden-dim": 512,
        "--output-dim": 128,
        "--optimizer": "adam",
        "--lr": 1e-3,
        "--precision": "auto",
        "--augment": "batched",
        "--device": "auto",
        "--devices": 1,
        "--temperature": 0.1,
        "--cosine-period": None,
        "--macl-alpha": 0.5,
        "--knn-k": 20,
        "--knn-t": 0.1,
        "--probe-epochs": 100,
        "--density-k": 20,
        "--isogclr-rho": 0.4,
        "--isogclr-eta": 0.2,
        "--dystress-tau-min": 0.07,
        "--smoke": False,
        "--no-checkpoints": False,
        "--no-progress": False,
        "--download": False,
    }
    assert {flag: actions[flag].default for flag in defaults} == defaults
    args = parser.parse_args(
        [
            "--losses",
            "all",
            "--seeds",
            "0",
            "1",
            "--claim-seeds",
            "--smoke",
            "--dataset",
            "folder",
            "x",
            "--preset",
            "cifar10-lt",
            "--isogclr-tau-min",
            "0.1",
            "--cosine-period",
            "2",
        ]
    )
    assert (args.losses, args.seeds, args.claim_seeds, args.smoke) == (["all"], [0, 1], [], True)
    assert (args.dataset, args.preset, args.isogclr_tau_min) == (["folder", "x"], "cifar10-lt", 0.1)
    assert args.cosine_period == 2.0
    for flag, choices in [
        ("--backbone", "{convnet,resnet18}"),
        ("--optimizer", "{adam,adamw,sgd,lars}"),
        ("--precision", "{auto,32,bf16}"),
        ("--preset", "{cifar10-lt,cifar100-lt,imagenet100-lt}"),
    ]:
        assert f"{flag} {choices}" in parser.format_help()
    for bad in (
        ["--optimizer", "rmsprop"],
        ["--device", "tpu"],
        ["--seeds", "-1"],
        ["--lr", "nan"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
