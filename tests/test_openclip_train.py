"""End-to-end tests of ``openclip_tau.train`` on Fashion-MNIST image-caption pairs (CPU).

Runs call ``openclip_tau.train.main(argv)`` in this process (one thread, fp32, no data workers,
a full-image crop) so that seeded runs are deterministic and cheap; the 2-process run uses
``torchrun``. Shards follow img2dataset's layout with sparse string keys and one corrupt image.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import open_clip
import pytest
import torch
from open_clip_train import logger as upstream_logger
from open_clip_train import main as upstream_main
from open_clip_train import train as upstream_train
from open_clip_train import zero_shot as upstream_zero_shot
from openclip_fixtures import (
    NO_CROP_AUGMENTATION,
    TINY_MODEL,
    fashion_mnist,
    img2dataset_key,
    jpeg_bytes,
    loss_values,
    register_tiny_model,
    shard_pattern,
    torchrun_train,
    write_csv,
    write_shards,
    zero_shot_accuracy,
)

from openclip_tau import data as tau_data
from openclip_tau import key_index, train
from openclip_tau.key_index import MissingKeyError, build_key_index, load_key_index

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
NUM_SAMPLES = 512
PER_SHARD = 128
NUM_SHARDS = NUM_SAMPLES // PER_SHARD
EPOCHS = 3
BATCH = 32
TAU_INIT = 0.05
# Integer keys: img2dataset's "SSSSSPPPP" read as a number is below NUM_SHARDS * 10**4.
TABLE = NUM_SHARDS * 10**4
CORRUPT_KEY = img2dataset_key(2, 5)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("openclip_train")
    register_tiny_model(root)
    write_shards(root / "shards", NUM_SAMPLES, PER_SHARD, corrupt_keys=[CORRUPT_KEY])
    assert key_index.main(["--shards", shards(root), "--output", str(root / "key_index.txt")]) == 0
    return root


def shards(root: Path) -> str:
    return shard_pattern(root / "shards", NUM_SHARDS)


def common_args(root: Path, name: str, epochs: int = EPOCHS) -> list[str]:
    return [
        "--model",
        TINY_MODEL,
        "--train-data",
        shards(root),
        "--dataset-type",
        "webdataset",
        "--train-num-samples",
        str(NUM_SAMPLES),
        "--batch-size",
        str(BATCH),
        "--epochs",
        str(epochs),
        "--lr",
        "5e-4",
        "--warmup",
        "2",
        "--lr-scheduler",
        "const",  # the schedule of the first epochs does not depend on --epochs
        "--workers",
        "0",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--seed",
        "0",
        "--log-every-n-steps",
        "1",
        "--logs",
        str(root / "logs"),
        "--name",
        name,
        *NO_CROP_AUGMENTATION,
    ]


def run(root: Path, name: str, loss_args: list[str], extra: list[str] = (), **kw) -> Path:
    shutil.rmtree(root / "logs" / name, ignore_errors=True)
    assert train.main(loss_args + common_args(root, name, **kw) + list(extra)) is None
    return root / "logs" / name


def checkpoint(run_dir: Path, name: str) -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=False)


# Settings that learn in 48 steps of batch 32 (10 classes, so about 3 false negatives per
# anchor): milder temperatures than the CC3M recipe, and a KL radius well below log(31).
LOSS_ARGS = {
    "clip": ["--loss", "clip"],
    "siglip": ["--loss", "siglip"],
    "dystress": ["--loss", "dystress", "--tau-min", "0.03", "--tau-max", "0.1"],
    # The two stateful losses cover both ways of indexing webdataset keys.
    "sogclr": ["--loss", "sogclr", "--tau-temperature", "0.05"],
    "isogclr": [
        "--loss",
        "isogclr",
        "--tau-num-samples",
        str(TABLE),
        "--tau-rho",
        "0.5",
        "--tau-init",
        str(TAU_INIT),
    ],
}
EXTRA_ARGS = {
    "isogclr": ["--report-to", "tensorboard", "--save-most-recent"],
}


@pytest.fixture(scope="module")
def runs(workdir: Path) -> dict[str, Path]:
    """One uninterrupted 3-epoch run per loss, shared by the tests below."""
    out = {}
    for loss, args in LOSS_ARGS.items():
        if loss == "sogclr":
            args = args + ["--tau-key-index", str(workdir / "key_index.txt")]
        out[loss] = run(workdir, f"full-{loss}", args, EXTRA_ARGS.get(loss, []))
    return out


# ---------------------------------------------------------------------------------- training
@pytest.mark.slow
@pytest.mark.parametrize("loss", list(LOSS_ARGS))
def test_each_loss_trains_and_its_loss_decreases(runs: dict[str, Path], loss: str) -> None:
    values = loss_values(runs[loss] / "out.log")
    steps = NUM_SAMPLES // BATCH
    assert len(values) == EPOCHS * steps
    assert all(math.isfinite(v) for v in values)
    first, last = np.mean(values[:steps]), np.mean(values[-steps:])
    assert last < first, f"{loss}: epoch means {first:.4f} -> {last:.4f}"
    if loss == "siglip":
        return  # upstream's loss, unchanged; at this budget it is still near chance
    # It learned the task, not only a collapse to the uniform loss: held-out images are
    # classified by their nearest class prompt well above chance (0.1).
    accuracy = zero_shot_accuracy(runs[loss] / "checkpoints" / f"epoch_{EPOCHS}.pt")
    assert accuracy > 0.15, f"{loss}: zero-shot accuracy {accuracy:.3f}"
    saved = checkpoint(runs[loss], f"epoch_{EPOCHS}.pt")
    assert saved["loss_name"] == loss
    assert "loss_state_dict" in saved


def test_stateful_checkpoints_hold_the_state_and_temperatures_move(runs: dict[str, Path]) -> None:
    saved = checkpoint(runs["isogclr"], f"epoch_{EPOCHS}.pt")
    state = saved["loss_state_dict"]
    assert saved["loss_options"]["num_samples"] == TABLE
    for role in ("image", "text"):
        tau = state[f"state.tau_{role}"]
        assert tau.shape == (TABLE,)
        visited = torch.isfinite(state[f"state.log_u_{role}"])
        # Only keys that exist were visited: integer keys are shard * 10**4 + position.
        keys = visited.nonzero().flatten()
        assert set((keys // 10**4).tolist()) <= set(range(NUM_SHARDS))
        assert ((keys % 10**4) < PER_SHARD).all()
        assert visited.sum() >= 0.9 * NUM_SAMPLES
        # The temperatures moved away from tau_init, and differ between samples.
        assert (tau[visited] != TAU_INIT).float().mean() > 0.9
        assert tau[visited].std() > 1e-3
        assert (tau[~visited] == TAU_INIT).all()
    # --save-most-recent: epoch_latest.pt is the same checkpoint.
    latest = checkpoint(runs["isogclr"], "epoch_latest.pt")
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(latest["loss_state_dict"][key], value)
    # SogCLR indexed by the key index: dense table, one row per sample.
    sog = checkpoint(runs["sogclr"], f"epoch_{EPOCHS}.pt")["loss_state_dict"]
    assert sog["state.log_u_image"].shape == (NUM_SAMPLES,)
    assert torch.isfinite(sog["state.log_u_image"]).float().mean() > 0.9


def test_logit_scale_carries_the_loss_temperature(runs: dict[str, Path]) -> None:
    """sogclr: ln(1/0.05) exactly; dystress: inside [ln(1/tau_max), ln(1/tau_min)]; clip keeps
    its learned scale (upstream clamps it at ln(100))."""
    sog = checkpoint(runs["sogclr"], f"epoch_{EPOCHS}.pt")["state_dict"]["logit_scale"]
    assert sog.item() == torch.log(1.0 / torch.tensor(0.05)).item()
    dys = checkpoint(runs["dystress"], f"epoch_{EPOCHS}.pt")["state_dict"]["logit_scale"]
    assert math.log(1 / 0.1) <= dys.item() <= math.log(1 / 0.03)
    first = checkpoint(runs["dystress"], "epoch_1.pt")["state_dict"]["logit_scale"]
    assert first.item() != dys.item()  # the epoch's mean positive temperature moves
    clip = checkpoint(runs["clip"], f"epoch_{EPOCHS}.pt")["state_dict"]["logit_scale"]
    assert 0 < clip.item() <= math.log(100) and abs(clip.item() - math.log(1 / 0.07)) < 0.1


def test_corrupt_shard_member_is_skipped_and_never_written(runs: dict[str, Path]) -> None:
    log = (runs["isogclr"] / "out.log").read_text()
    assert "Handling webdataset error" in log
    state = checkpoint(runs["isogclr"], f"epoch_{EPOCHS}.pt")["loss_state_dict"]
    corrupt = int(CORRUPT_KEY)
    assert state["state.log_u_image"][corrupt] == -math.inf
    assert state["state.tau_text"][corrupt] == TAU_INIT
    # Its neighbours in the same shard were trained on.
    assert torch.isfinite(state["state.log_u_image"][corrupt - 1 : corrupt + 2 : 2]).all()
    sog = checkpoint(runs["sogclr"], f"epoch_{EPOCHS}.pt")["loss_state_dict"]
    dense = int(
        load_key_index(runs["sogclr"].parents[1] / "key_index.txt").indices([CORRUPT_KEY])[0]
    )
    assert sog["state.log_u_image"][dense] == -math.inf


def test_temperature_statistics_reach_console_and_tensorboard(runs: dict[str, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = (runs["isogclr"] / "out.log").read_text()
    assert "Loss stats epoch 2" in log and "batch_tau_text_p90" in log and "objective" in log
    events = EventAccumulator(str(runs["isogclr"] / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in (
        "train/objective",
        "train/batch_tau_image_mean",
        "train/batch_tau_text_p10",
        "train/table_tau_image_p50",
        "train/table_tau_text_mean",
        "train/loss",
    ):
        assert tag in tags
    steps_per_epoch = NUM_SAMPLES // BATCH
    steps = [e.step for e in events.Scalars("train/batch_tau_image_mean")]
    assert steps == list(range(EPOCHS * steps_per_epoch))
    # The whole table's statistics once per epoch, at the epoch's last step.
    table = events.Scalars("train/table_tau_image_mean")
    assert [e.step for e in table] == [steps_per_epoch * (e + 1) - 1 for e in range(EPOCHS)]
    assert "Table stats epoch 2" in log and "table_tau_text_p50" in log
    # The loss dict that OpenCLIP sums holds the loss only, never the statistics.
    loss_tags = [t for t in tags if "loss" in t]
    assert sorted(loss_tags) == ["train/contrastive_loss", "train/loss"]


class Killed(Exception):
    pass


@pytest.mark.slow
def test_killed_run_resumed_with_resume_latest_ends_like_an_uninterrupted_one(
    workdir: Path, runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "killed-isogclr"
    loss_args = LOSS_ARGS["isogclr"]
    real_epoch = upstream_train.train_one_epoch

    def dies_in_second_epoch(*args, **kwargs):
        if args[3] == 1:  # epoch 1 starts: epoch_1.pt is on disk
            raise Killed()
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(upstream_train, "train_one_epoch", dies_in_second_epoch)
    shutil.rmtree(workdir / "logs" / name, ignore_errors=True)
    with pytest.raises(Killed):
        train.main(loss_args + common_args(workdir, name))
    monkeypatch.setattr(upstream_train, "train_one_epoch", real_epoch)
    assert os.listdir(workdir / "logs" / name / "checkpoints") == ["epoch_1.pt"]

    assert train.main(loss_args + common_args(workdir, name) + ["--resume", "latest"]) is None
    log = (workdir / "logs" / name / "out.log").read_text()
    assert "restored the isogclr loss state" in log

    resumed = checkpoint(workdir / "logs" / name, f"epoch_{EPOCHS}.pt")
    straight = checkpoint(runs["isogclr"], f"epoch_{EPOCHS}.pt")
    for key, value in straight["loss_state_dict"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(resumed["loss_state_dict"][key], value), key
    assert resumed["loss_state_dict"]["_extra_state"] == {"epoch": EPOCHS - 1}
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


def test_resume_with_another_table_size_or_loss_is_refused(
    workdir: Path, runs: dict[str, Path]
) -> None:
    path = str(runs["isogclr"] / "checkpoints" / "epoch_1.pt")
    with pytest.raises(train.TrainingSetupError, match=f"num_samples={TABLE + 1}"):
        run(
            workdir,
            "bad-size",
            ["--loss", "isogclr", "--tau-num-samples", str(TABLE + 1)],
            ["--resume", path],
        )
    with pytest.raises(train.TrainingSetupError, match="trained with --loss isogclr"):
        run(
            workdir,
            "bad-loss",
            ["--loss", "sogclr", "--tau-num-samples", str(TABLE)],
            ["--resume", path],
        )


@pytest.mark.slow
def test_accum_freq_updates_the_state_once_per_optimizer_step(workdir: Path) -> None:
    # Two accumulated batches of 16 make the same optimizer steps as one batch of 32. The epoch
    # stays inside one pass over the shards (upstream drops a pass's last partial batch, whose
    # size depends on the batch size).
    epoch = ["--train-num-samples", str(14 * BATCH)]
    loss_args = LOSS_ARGS["isogclr"]
    straight = run(workdir, "straight-isogclr", loss_args, epoch, epochs=1)
    accum = run(
        workdir,
        "accum-isogclr",
        loss_args,
        epoch + ["--accum-freq", "2", "--batch-size", str(BATCH // 2)],
        epochs=1,
    )
    ours = checkpoint(accum, "epoch_1.pt")["loss_state_dict"]
    theirs = checkpoint(straight, "epoch_1.pt")["loss_state_dict"]
    visited = torch.isfinite(theirs["state.log_u_image"])
    assert visited.sum() == 14 * BATCH
    assert torch.equal(visited, torch.isfinite(ours["state.log_u_image"]))
    for key in ("state.log_u_image", "state.tau_image", "state.log_u_text", "state.tau_text"):
        torch.testing.assert_close(ours[key][visited], theirs[key][visited], atol=1e-4, rtol=1e-4)
    assert loss_values(accum / "out.log") == pytest.approx(
        loss_values(straight / "out.log"), abs=1e-4
    )


def test_zero_shot_accuracy_counts_top_k_hits() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.5], [0.2, 0.3, 0.1]])
    target = torch.tensor([1, 2, 2])
    assert train.zero_shot_accuracy(logits, target, topk=(1, 2)) == [1.0, 2.0]


@pytest.mark.slow
def test_imagenet_val_zero_shot_runs_under_numpy_2(
    runs: dict[str, Path], workdir: Path, tmp_path: Path
) -> None:
    """OpenCLIP's own --imagenet-val evaluation of a trained checkpoint (upstream 3.3.0's
    accuracy() fails under NumPy >= 2.3; openclip_tau.train replaces it for the run only)."""
    pixels, labels = fashion_mnist(40, split="test")
    for n, (image, label) in enumerate(zip(pixels, labels)):
        # ImageFolder numbers the class folders in sorted order: ImageNet's first classes.
        folder = tmp_path / "val" / f"class{label % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{n}.jpg").write_bytes(jpeg_bytes(image))
    upstream_accuracy = upstream_zero_shot.accuracy
    name = "zero-shot"
    shutil.rmtree(workdir / "logs" / name, ignore_errors=True)
    args = ["--loss", "clip", "--model", TINY_MODEL, "--device", "cpu", "--precision", "fp32"]
    args += ["--pretrained", str(runs["isogclr"] / "checkpoints" / f"epoch_{EPOCHS}.pt")]
    args += ["--imagenet-val", str(tmp_path / "val"), "--zeroshot-frequency", "1"]
    args += ["--batch-size", "16", "--workers", "0", "--logs", str(workdir / "logs")]
    assert train.main(args + ["--name", name]) is None
    log = (workdir / "logs" / name / "out.log").read_text()
    top1 = float(log.split("imagenet-zeroshot-val-top1: ")[1].split()[0])
    top5 = float(log.split("imagenet-zeroshot-val-top5: ")[1].split()[0])
    assert 0.0 <= top1 <= top5 <= 1.0
    assert upstream_zero_shot.accuracy is upstream_accuracy  # restored after the run


def test_csv_rows_index_the_state(workdir: Path) -> None:
    csv_path = write_csv(workdir / "csv", 256)
    name = "csv-isogclr"
    args = common_args(workdir, name, epochs=1)
    args[args.index("--train-data") + 1] = str(csv_path)
    args[args.index("--dataset-type") + 1] = "csv"
    shutil.rmtree(workdir / "logs" / name, ignore_errors=True)
    assert train.main(["--loss", "isogclr"] + args) is None
    saved = checkpoint(workdir / "logs" / name, "epoch_1.pt")
    assert saved["loss_options"]["num_samples"] == 256
    # 256 rows in 4 full batches: every row visited exactly in this epoch.
    assert torch.isfinite(saved["loss_state_dict"]["state.log_u_text"]).all()


@contextlib.contextmanager
def upstream_logging() -> Iterator[None]:
    """Undoes upstream's ``setup_logging`` afterwards: its handlers and the levels it sets.

    It sets every logger to INFO, torch's internal ones included, which then print their INFO
    lines (``TorchDynamo compilation metrics``, ``FakeTensor cache stats``) when pytest exits.
    """
    handlers, root_level = list(logging.root.handlers), logging.root.level
    levels = {
        name: getattr(logger, "level", logging.NOTSET)
        for name, logger in logging.root.manager.loggerDict.items()
    }
    try:
        yield
    finally:
        for handler in logging.root.handlers[:]:
            if handler not in handlers:
                logging.root.removeHandler(handler)
                handler.close()
        logging.root.setLevel(root_level)
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if isinstance(logger, logging.Logger):
                logger.setLevel(levels.get(name, logging.NOTSET))


def test_upstream_logging_setup_is_undone() -> None:
    torch_logger = logging.getLogger("torch._dynamo.utils")
    before = (torch_logger.level, logging.root.level, list(logging.root.handlers))
    with upstream_logging():
        upstream_logger.setup_logging(None, logging.INFO)
        assert torch_logger.level == logging.INFO  # what upstream does
    assert (torch_logger.level, logging.root.level, list(logging.root.handlers)) == before
    assert not torch_logger.isEnabledFor(logging.INFO)


@pytest.mark.slow
def test_clip_on_csv_is_upstream_open_clip_train(workdir: Path) -> None:
    csv_path = write_csv(workdir / "csv-clip", 128)

    def argv(name: str) -> list[str]:
        args = common_args(workdir, name, epochs=1)
        args[args.index("--train-data") + 1] = str(csv_path)
        args[args.index("--dataset-type") + 1] = "csv"
        shutil.rmtree(workdir / "logs" / name, ignore_errors=True)
        return args

    assert train.main(["--loss", "clip"] + argv("clip-ours")) is None
    with upstream_logging():
        assert upstream_main.main(argv("clip-upstream")) is None
    ours = checkpoint(workdir / "logs" / "clip-ours", "epoch_1.pt")
    theirs = checkpoint(workdir / "logs" / "clip-upstream", "epoch_1.pt")
    assert "loss_name" not in theirs and ours["loss_name"] == "clip"
    for key, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][key], value), key


@pytest.mark.slow
def test_two_process_torchrun_on_cpu(workdir: Path) -> None:
    name = "torchrun-isogclr"
    shutil.rmtree(workdir / "logs" / name, ignore_errors=True)
    args = common_args(workdir, name, epochs=2)
    args[args.index("--workers") + 1] = "1"  # one data worker per rank: 4 shards >= 2 x 1
    torchrun_train(workdir, [*LOSS_ARGS["isogclr"], *args], timeout=600)
    log = (workdir / "logs" / name / "out.log").read_text()
    assert "Running in distributed mode with multiple processes" in log
    assert "total 2" in log
    # Both ranks hold the same state (checked by the run itself after every epoch).
    assert log.count("per-sample state identical on all 2 ranks") == 2
    values = loss_values(workdir / "logs" / name / "out.log")
    assert len(values) == 2 * NUM_SAMPLES // (2 * BATCH) and all(math.isfinite(v) for v in values)
    state = checkpoint(workdir / "logs" / name, "epoch_2.pt")["loss_state_dict"]
    assert torch.isfinite(state["state.log_u_image"]).sum() >= 0.9 * NUM_SAMPLES


# ---------------------------------------------------------------------------------- bad input
def test_unknown_loss_lists_the_choices(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        train.main(["--loss", "infonce"] + common_args(workdir, "bad"))
    err = capsys.readouterr().err
    assert "--loss: invalid choice: 'infonce'" in err
    assert "clip" in err and "siglip" in err and "isogclr" in err and "dystress" in err


def test_options_of_another_loss_and_stray_tau_flags_are_refused(
    workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        train.main(["--loss", "sogclr", "--tau-rho", "6"] + common_args(workdir, "bad"))
    assert "--tau-rho applies to --loss isogclr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--loss", "isogclr", "--tau-rhoo", "6"] + common_args(workdir, "bad"))
    assert "--tau-rhoo" in capsys.readouterr().err
    with pytest.raises(train.TrainingSetupError, match="use --loss siglip"):
        train.main(["--loss", "isogclr", "--siglip"] + common_args(workdir, "bad"))


def test_stateful_loss_on_webdataset_needs_a_table_size(workdir: Path) -> None:
    with pytest.raises(train.TrainingSetupError, match="--tau-key-index.*--tau-num-samples"):
        train.main(["--loss", "isogclr"] + common_args(workdir, "no-size"))


def test_key_beyond_the_table_is_named(workdir: Path) -> None:
    with pytest.raises(
        ValueError, match=r"Sample key '0000\d{5}'.*outside the per-sample table \[0, 100\)"
    ):
        run(workdir, "small-table", ["--loss", "sogclr", "--tau-num-samples", "100"])


def test_shard_missing_from_the_key_index_is_named_before_training(workdir: Path) -> None:
    partial = workdir / "partial_index.txt"
    build_key_index(shard_pattern(workdir / "shards", NUM_SHARDS - 1), partial)
    with pytest.raises(train.TrainingSetupError, match=f"{NUM_SHARDS - 1:05d}.tar"):
        run(workdir, "partial-index", ["--loss", "isogclr", "--tau-key-index", str(partial)])


def test_nan_features_raise(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def nan_image_features(self, image, normalize=False):
        return torch.full((image.shape[0], 32), float("nan"))

    monkeypatch.setattr(open_clip.CLIP, "encode_image", nan_image_features)
    with pytest.raises(ValueError, match="image_features contains NaN"):
        run(workdir, "nan", LOSS_ARGS["isogclr"], epochs=1)


# ---------------------------------------------------------------------------------- pieces
def test_key_index_round_trip_and_errors(workdir: Path, tmp_path: Path) -> None:
    index = load_key_index(workdir / "key_index.txt")
    assert len(index) == NUM_SAMPLES
    assert list(index.shards) == [f"{s:05d}.tar" for s in range(NUM_SHARDS)]
    keys = index.keys
    assert keys[:2] == [img2dataset_key(0, 0), img2dataset_key(0, 1)]
    assert keys[PER_SHARD] == img2dataset_key(1, 0)
    probe = [keys[300], keys[7], keys[300]]
    assert index.indices(probe).tolist() == [300, 7, 300]
    with pytest.raises(MissingKeyError, match="'999999999'"):
        index.indices([keys[0], "999999999"])
    indexer = tau_data.SampleIndexer(NUM_SAMPLES, index)
    with pytest.raises(tau_data.SampleKeyError, match=r"'999999999'.*\(shard s1.tar\)"):
        indexer(["000000000", "999999999"], ["s0.tar", "s1.tar"])
    with pytest.raises(ValueError, match="'abc'.*not an integer"):
        tau_data.SampleIndexer(10)(["abc"], ["s.tar"])
    with pytest.raises(ValueError, match="'12'.*outside the per-sample table"):
        tau_data.SampleIndexer(10)(["3", "12"], ["s.tar", "s.tar"])
    # A key that occurs in two shards cannot identify a sample.
    write_shards(tmp_path / "dup", 8, 4, key_fn=lambda shard, pos: f"k{pos}")
    with pytest.raises(ValueError, match="'k0' occurs in shard 00000.tar and again"):
        build_key_index(shard_pattern(tmp_path / "dup", 2), tmp_path / "dup.txt")
    with pytest.raises(FileNotFoundError, match="python -m openclip_tau.key_index"):
        load_key_index(tmp_path / "missing.txt")


def test_end_of_shard_markers_are_dropped() -> None:
    files = [{"fname": "a.jpg", "data": b""}, {}, {"fname": "b.jpg", "data": b""}, {}]
    assert list(tau_data._drop_end_of_shard_markers(iter(files))) == [files[0], files[2]]
