"""``openclip_tau.train`` and ``openclip_tau.key_index``: every bad input is one line and exit
code 2, found before the model is built (``open_clip.create_model_and_transforms`` is replaced
by a function that fails the test), also under torchrun with 2 processes (rank 0 prints it).
"""

from __future__ import annotations

import shutil
import sys
import tarfile
from pathlib import Path
from typing import Callable

import pytest
import torch
from open_clip_train import main as upstream_main
from openclip_fixtures import (
    TINY_MODEL,
    register_tiny_model,
    shard_pattern,
    train_process,
    write_csv,
    write_shards,
)

from openclip_tau import key_index, train
from openclip_tau.key_index import build_key_index, expand_shards

NUM_SAMPLES = 128
PER_SHARD = 32
NUM_SHARDS = NUM_SAMPLES // PER_SHARD
TABLE = NUM_SHARDS * 10**4
CSV_ROWS = 192


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("openclip_inputs")
    register_tiny_model(root)
    write_shards(root / "shards", NUM_SAMPLES, PER_SHARD)
    build_key_index(shards(root), root / "key_index.txt")
    build_key_index(expand_shards(shards(root))[:-1], root / "three_shards.txt")
    write_csv(root / "csv", CSV_ROWS)
    return root


def shards(root: Path) -> str:
    return shard_pattern(root / "shards", NUM_SHARDS)


def common_args(root: Path, name: str, csv: bool = False) -> list[str]:
    shutil.rmtree(root / "logs" / name, ignore_errors=True)
    data = str(root / "csv" / "train.csv") if csv else shards(root)
    return [
        *("--model", TINY_MODEL, "--train-data", data),
        *("--dataset-type", "csv" if csv else "webdataset", "--train-num-samples", "64"),
        *("--batch-size", "16", "--epochs", "1", "--workers", "0", "--device", "cpu"),
        *("--precision", "fp32", "--logs", str(root / "logs"), "--name", name),
    ]


def never(*args, **kwargs):
    raise AssertionError("the model was built")


def refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, argv: list) -> str:
    """The console entry's error line for ``argv`` (exit 2, no traceback, no model built)."""
    monkeypatch.setattr(upstream_main, "create_model_and_transforms", never)
    monkeypatch.setattr(sys, "argv", ["openclip_tau.train", *argv])
    with pytest.raises(SystemExit) as exit_info:
        train.cli()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # upstream's log lines (if it got that far), then ours
    assert "Traceback" not in err, err
    last = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert "openclip_tau.train: error: " in last, err[-2000:]
    assert err.count("error: ") == 1, err[-2000:]
    return last


def fake_checkpoint(path: Path, **entries) -> Path:
    """A training checkpoint as open_clip_train writes it, with the given loss entries."""
    torch.save({"epoch": 1, "state_dict": {}, "optimizer": {}, **entries}, path)
    return path


def sogclr_checkpoint(tmp_path: Path, num_samples: int, index: str) -> Path:
    options = {"num_samples": num_samples, "index": index, "kwargs": {}}
    return fake_checkpoint(
        tmp_path / "sogclr.pt",
        loss_name="sogclr",
        loss_options=options,
        loss_state_dict={"state.log_u_image": torch.zeros(num_samples)},
    )


# ---------------------------------------------------------------------------- refused early
CASES: dict[str, tuple[Callable[[Path, Path], list[str]], str]] = {
    # item 3: files that do not exist
    "missing-key-index": (
        lambda root, tmp: (
            ["--loss", "sogclr", "--tau-key-index", str(tmp / "none.txt")]
            + common_args(root, "missing-key-index")
        ),
        "--tau-key-index {tmp}/none.txt: Key index {tmp}/none.txt does not exist; build it",
    ),
    "missing-resume": (
        lambda root, tmp: (
            ["--loss", "dystress", "--resume", str(tmp / "none.pt")]
            + common_args(root, "missing-resume")
        ),
        "--resume {tmp}/none.pt: no such file.",
    ),
    "missing-resume-stateful": (
        lambda root, tmp: (
            ["--loss", "sogclr", "--tau-num-samples", str(TABLE)]
            + ["--resume", str(tmp / "none.pt")]
            + common_args(root, "missing-resume-stateful")
        ),
        "--resume {tmp}/none.pt: no such file.",
    ),
    # item 5: the data's files against the table
    "num-samples-below-csv-rows": (
        lambda root, tmp: (
            ["--loss", "isogclr", "--tau-num-samples", "100"]
            + common_args(root, "below-csv", csv=True)
        ),
        f"--tau-num-samples 100 is smaller than the {CSV_ROWS} rows of the csv",
    ),
    "shard-missing-from-key-index": (
        lambda root, tmp: (
            ["--loss", "sogclr", "--tau-key-index", str(root / "three_shards.txt")]
            + common_args(root, "shard-missing")
        ),
        "1 training shard(s) are not in the key index",
    ),
    # item 5: every resume refusal, from the checkpoint's loss entries
    "resume-another-loss": (
        lambda root, tmp: (
            ["--loss", "isogclr", "--tau-num-samples", str(TABLE)]
            + ["--resume", str(sogclr_checkpoint(tmp, TABLE, "integer keys"))]
            + common_args(root, "another-loss")
        ),
        "sogclr.pt was trained with --loss sogclr; resume it with --loss sogclr, not --loss "
        "isogclr.",
    ),
    "resume-another-loss-clip": (
        lambda root, tmp: (
            ["--loss", "clip", "--resume", str(sogclr_checkpoint(tmp, 5, "x"))]
            + common_args(root, "another-loss-clip")
        ),
        "trained with --loss sogclr; resume it with --loss sogclr, not --loss clip.",
    ),
    "resume-another-table-size": (
        lambda root, tmp: (
            ["--loss", "sogclr", "--tau-num-samples", str(TABLE)]
            + ["--resume", str(sogclr_checkpoint(tmp, TABLE + 1, "integer keys"))]
            + common_args(root, "another-size")
        ),
        f"holds a per-sample table of {TABLE + 1} rows; this run's has {TABLE}",
    ),
    "resume-another-csv": (
        lambda root, tmp: (
            ["--loss", "sogclr"]
            + ["--resume", str(sogclr_checkpoint(tmp, CSV_ROWS, "csv sha256:0123"))]
            + common_args(root, "another-csv", csv=True)
        ),
        "was trained with another sample-to-row map (csv sha256:0123); this run uses csv sha256:",
    ),
    "resume-another-key-index": (
        lambda root, tmp: (
            ["--loss", "sogclr", "--tau-key-index", str(root / "key_index.txt")]
            + ["--resume", str(sogclr_checkpoint(tmp, NUM_SAMPLES, "key index sha256:0123"))]
            + common_args(root, "another-index")
        ),
        "another sample-to-row map (key index sha256:0123); this run uses key index sha256:",
    ),
    "resume-without-loss-state": (
        lambda root, tmp: (
            ["--loss", "sogclr", "--tau-num-samples", str(TABLE)]
            + ["--resume", str(fake_checkpoint(tmp / "bare.pt"))]
            + common_args(root, "no-state")
        ),
        "bare.pt holds no loss state",
    ),
    # item 6: nonsense values
    "rho-inf": (
        lambda root, tmp: ["--loss", "isogclr", "--tau-rho", "inf"] + common_args(root, "inf"),
        "--tau-rho must be a finite number, got inf.",
    ),
    "temperature-nan": (
        lambda root, tmp: (
            ["--loss", "sogclr", "--tau-temperature", "nan"] + common_args(root, "nan")
        ),
        "--tau-temperature must be a finite number, got nan.",
    ),
    "seed-negative": (
        lambda root, tmp: ["--loss", "tempnet", "--tau-seed", "-1"] + common_args(root, "seed"),
        "--tau-seed must be a non-negative integer, got -1.",
    ),
    "loss-repeated": (
        lambda root, tmp: ["--loss", "sogclr", "--loss=isogclr"] + common_args(root, "twice"),
        "--loss is given 2 times (sogclr, isogclr); give it once.",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_before_the_model_is_built(
    workdir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    case: str,
) -> None:
    argv, message = CASES[case]
    line = refused(monkeypatch, capsys, argv(workdir, tmp_path))
    assert message.format(tmp=tmp_path) in line, line


def test_a_repeated_tau_option_keeps_the_last_value() -> None:
    """Recipes append overrides to their defaults (recipes/cc3m/train.sh): the last one wins."""
    options, _ = train.parse_loss_args(
        ["--loss", "sogclr", "--tau-gamma", "0.5", "--tau-gamma=0.7"]
    )
    assert options.tau_gamma == 0.7


def test_infinite_bounds_that_mean_no_bound_are_accepted() -> None:
    options, _ = train.parse_loss_args(["--loss", "isogclr", "--tau-max", "inf"])
    assert options.tau_max == float("inf")
    options, _ = train.parse_loss_args(["--loss", "isogclr", "--tau-grad-clip", "inf"])
    assert options.tau_grad_clip == float("inf")


def test_table_larger_than_the_csv_warns_with_both_numbers(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream_main, "create_model_and_transforms", never)
    argv = ["--loss", "sogclr", "--tau-num-samples", "500"]
    with pytest.raises(AssertionError, match="the model was built"):
        train.main(argv + common_args(workdir, "above-csv", csv=True))
    log = (workdir / "logs" / "above-csv" / "out.log").read_text()
    assert (
        f"WARNING | openclip_tau: --tau-num-samples 500 is larger than the {CSV_ROWS} rows of the "
        "csv: 308 rows of the per-sample table are never used." in log
    )


# ---------------------------------------------------------------------------- key index
@pytest.mark.parametrize("cut", ["header", "member-data", "next-header"])
def test_key_index_over_a_truncated_shard_names_it(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, cut: str
) -> None:
    source = workdir / "shards" / "00001.tar"
    data = source.read_bytes()
    with tarfile.open(source) as tar:
        middle = tar.getmembers()[len(tar.getmembers()) // 2]
    shard = tmp_path / "00001.tar"
    # A cut inside the first header; inside a member's data (tarfile lists such a copy without
    # complaint); inside the header after a complete member (tarfile stops there silently).
    position = {
        "header": 300,
        "member-data": middle.offset_data + middle.size // 2,
        "next-header": middle.offset + 100,
    }
    reason = {
        "header": "truncated header",
        "member-data": f"member {middle.name} ends at byte {middle.offset_data + middle.size}",
        "next-header": "no end-of-archive marker after the member ending at byte",
    }
    shard.write_bytes(data[: position[cut]])
    shutil.copy(workdir / "shards" / "00000.tar", tmp_path / "00000.tar")
    pattern = str(tmp_path / "{00000..00001}.tar")
    with pytest.raises(SystemExit) as exit_info:
        key_index.main(["--shards", pattern, "--output", str(tmp_path / "index.txt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"python -m openclip_tau.key_index: error: Shard {shard} is not a ")
    assert reason[cut] in err, err
    assert not (tmp_path / "index.txt").exists()


def test_key_index_of_complete_shards_without_padding_is_accepted(tmp_path: Path) -> None:
    """The end-of-archive blocks cut after them: every member is complete."""
    write_shards(tmp_path / "full", 8, 8)
    data = (tmp_path / "full" / "00000.tar").read_bytes()
    end = len(data.rstrip(b"\0"))
    (tmp_path / "00000.tar").write_bytes(data[: end + (-end % 512) + 512])
    assert build_key_index(str(tmp_path / "00000.tar"), tmp_path / "index.txt") == 8


# ---------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_under_torchrun_rank_0_prints_the_one_line_and_every_rank_exits_2(
    workdir: Path, tmp_path: Path
) -> None:
    """2 gloo processes: a bad value (found while parsing) and a missing --resume file (found
    after the distributed setup, before the model): our line appears once; torchrun prints its
    own failure summary (every rank's exit code 2) and exits with 1."""
    for argv, message in (
        (["--loss", "sogclr", "--loss", "isogclr"], "--loss is given 2 times"),
        (["--loss", "dystress", "--resume", str(tmp_path / "none.pt")], "none.pt: no such file."),
    ):
        result = train_process(workdir, argv + common_args(workdir, "torchrun-bad"), processes=2)
        assert result.returncode == 1, result.stderr[-3000:]
        err = result.stderr
        assert err.count("openclip_tau.train: error: ") == 1, err[-3000:]
        assert message in err
        assert "ChildFailedError" in err  # torchrun's own summary
        assert "exitcode  : 2" in err and "exitcode  : 1" not in err
        assert "build_model" not in err and "create_model" not in err
