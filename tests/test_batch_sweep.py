"""``python -m recipes.longtail.sweep``: SogCLR's small-batch claim as a batch-size sweep. The
table logic on hand-made rows, and the whole sweep in its smoke mode."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # recipes/ is run from the repository, not installed
    sys.path.insert(0, str(ROOT))

from recipes.longtail import sweep  # noqa: E402


def _row(profile: str, loss: str, batch: int, seed: int, probe: float) -> dict:
    return {
        "profile": profile,
        "loss": loss,
        "batch_size": batch,
        "seed": seed,
        "knn_all": probe - 0.1,
        "knn_tail": probe - 0.2,
        "probe_all": probe,
        "probe_tail": probe,
        "train_seconds": 1.0,
    }


def test_summary_and_batch_effect_against_hand_computation() -> None:
    rows = [
        _row("long-tailed", "ntxent", 32, 0, 0.70),
        _row("long-tailed", "ntxent", 32, 1, 0.72),
        _row("long-tailed", "ntxent", 256, 0, 0.80),
        _row("long-tailed", "ntxent", 256, 1, 0.80),
        _row("long-tailed", "sogclr", 32, 0, 0.80),
        _row("long-tailed", "sogclr", 32, 1, 0.82),
        _row("long-tailed", "sogclr", 256, 0, 0.81),
        _row("long-tailed", "sogclr", 256, 1, 0.79),
    ]
    summary = sweep.summarize(rows)
    assert [(r["loss"], r["batch_size"], r["seeds"]) for r in summary] == [
        ("ntxent", 32, 2),
        ("ntxent", 256, 2),
        ("sogclr", 32, 2),
        ("sogclr", 256, 2),
    ]
    assert summary[0]["probe_all_mean"] == pytest.approx(0.71)
    assert summary[0]["probe_all_std"] == pytest.approx(math.sqrt(2) * 0.01)
    effects = {e["loss"]: e for e in sweep.batch_effect(summary)}
    assert effects["ntxent"]["change"] == pytest.approx(-0.09)
    assert effects["ntxent"]["seed_std"] == pytest.approx((math.sqrt(2) * 0.01 + 0) / 2)
    assert effects["sogclr"]["change"] == pytest.approx(0.01)
    assert "more than twice" in sweep.effect_sentence(effects["ntxent"])
    assert "within twice" in sweep.effect_sentence(effects["sogclr"])
    assert "-9.0 points from batch 256 to 32" in sweep.effect_sentence(effects["ntxent"])
    one_seed = sweep.batch_effect(sweep.summarize([rows[0], rows[2]]))[0]
    assert "one seed" in sweep.effect_sentence(one_seed)


def test_bad_batch_sizes_exit_before_training(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--batch-sizes", "1", "32", "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--batch-sizes must all be >= 2" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_sweep_writes_every_file(tmp_path: Path) -> None:
    """Both profiles x 2 batch sizes x 3 losses, one seed, 2 steps each: rows, table, plot."""
    output = tmp_path / "sweep"
    argv = ["--smoke", "--output", str(output), "--data-root", str(tmp_path / "data")]
    argv += ["--parallel-runs", "1", "--threads", "1", "--no-progress"]
    threads = torch.get_num_threads()
    try:
        assert sweep.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    with open(output / "sweep.csv") as handle:
        rows = list(csv.DictReader(handle))
    expected = [
        (profile, loss, batch)
        for profile in sweep.PROFILES
        for batch in (8, 16)
        for loss in sweep.DEFAULT_SWEEP_LOSSES
    ]
    assert [(r["profile"], r["loss"], int(r["batch_size"])) for r in rows] == expected
    for row in rows:
        # Two steps of the run's own batch size, whatever the batch.
        assert int(row["steps"]) == 2
        assert 0.0 <= float(row["probe_all"]) <= 1.0
    report = (output / "sweep.md").read_text()
    assert "batch 8 | batch 16" in report and "](sweep.png)" in report
    assert (output / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    with open(output / "sweep_summary.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(expected)
