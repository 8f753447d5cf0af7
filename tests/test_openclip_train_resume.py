"""``openclip_tau.train``: exact resume when the step draws random numbers, and independent seeds.

The end-to-end runs are real processes (one, or two gloo processes under torchrun) SIGKILLed
mid-epoch and resumed with ``--resume latest``; their last checkpoint must equal the one of an
uninterrupted run bit for bit: model, loss state, every optimizer tensor. Each step draws random
numbers in the main process: the model's patch dropout (``--force-patch-dropout``) and TempNet's
default dropout, with webdataset's persistent data workers.
"""

from __future__ import annotations

import itertools
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from open_clip_train import data as upstream_data
from open_clip_train import params as upstream_params
from openclip_fixtures import (
    NO_CROP_AUGMENTATION,
    TINY_MODEL,
    register_tiny_model,
    shard_pattern,
    train_process,
    write_shards,
)

from openclip_tau import data as tau_data

torch.set_num_threads(1)

NUM_SAMPLES = 256
PER_SHARD = 64
NUM_SHARDS = NUM_SAMPLES // PER_SHARD
GLOBAL_BATCH = 32
TABLE = NUM_SHARDS * 10**4  # integer img2dataset keys: shard * 10**4 + position
# TempNet with its default dropout (0.5), and patch dropout in the model: both draw from the
# main process's generators at every step.
RANDOM_STEP = ["--loss", "tempnet", "--tau-num-samples", str(TABLE), "--tau-lr", "1e-3"]
RANDOM_STEP += ["--tau-prototypes", "16", "--force-patch-dropout", "0.5"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("openclip_resume")
    register_tiny_model(root)
    write_shards(root / "shards", NUM_SAMPLES, PER_SHARD)
    return root


def train_args(root: Path, name: str, processes: int) -> list[str]:
    return [
        *("--model", TINY_MODEL, "--train-data", shard_pattern(root / "shards", NUM_SHARDS)),
        *("--dataset-type", "webdataset", "--train-num-samples", "64"),  # 2 steps per epoch
        *("--batch-size", str(GLOBAL_BATCH // processes), "--epochs", "2", "--lr", "5e-4"),
        # Persistent data workers: 2 in one process, 1 per rank under torchrun (4 shards).
        *("--warmup", "1", "--lr-scheduler", "const", "--workers", str(3 - processes)),
        *("--device", "cpu"),
        *("--precision", "fp32", "--seed", "0", "--save-most-recent", "--logs", str(root / "logs")),
        *("--name", name, *NO_CROP_AUGMENTATION),
    ]


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same(ours: Any, theirs: Any, what: str) -> None:
    """Bit-identical nested checkpoint entries (tensors: NaN where the other has NaN)."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and ours.dtype == theirs.dtype, what
        assert torch.equal(ours.isnan(), theirs.isnan()), what
        assert torch.equal(ours.nan_to_num(), theirs.nan_to_num()), what
    elif isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), what
        for key, value in theirs.items():
            assert_same(ours[key], value, f"{what}.{key}")
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), what
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{what}[{i}]")
    else:
        assert ours == theirs, what


# ---------------------------------------------------------------------------- exact resume
@pytest.mark.slow
@pytest.mark.parametrize(
    "processes, resampled",
    [(1, False), (1, True), (2, False), (2, True)],
    ids=["1proc", "1proc-resampled", "torchrun2", "torchrun2-resampled"],
)
def test_killed_run_with_random_steps_resumes_bit_identically(
    workdir: Path, processes: int, resampled: bool
) -> None:
    """SIGKILL after one step of epoch 1, then ``--resume latest``: epoch_2.pt equals the
    uninterrupted run's (model, loss state, optimizer state and groups, scaler-free fp32)."""
    extra = ["--dataset-resampled"] if resampled else []
    tag = f"{processes}{'r' if resampled else ''}"
    straight, killed = f"straight-{tag}", f"killed-{tag}"
    for name in (straight, killed):
        shutil.rmtree(workdir / "logs" / name, ignore_errors=True)
    done = train_process(
        workdir, RANDOM_STEP + train_args(workdir, straight, processes) + extra, processes
    )
    assert done.returncode == 0, done.stderr[-3000:]

    argv = RANDOM_STEP + train_args(workdir, killed, processes) + extra
    died = train_process(workdir, argv, processes, kill_at="1:1")
    assert died.returncode == (-9 if processes == 1 else 1), died.stderr[-3000:]
    folder = workdir / "logs" / killed / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_1.pt", "epoch_latest.pt"]
    resumed = train_process(workdir, argv + ["--resume", "latest"], processes)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (workdir / "logs" / killed / "out.log").read_text()
    assert "=> resuming checkpoint" in log and "(epoch 1)" in log

    theirs = checkpoint(workdir / "logs" / straight / "checkpoints" / "epoch_2.pt")
    ours = checkpoint(folder / "epoch_2.pt")
    assert ours["epoch"] == theirs["epoch"] == 2
    for key in ("state_dict", "loss_state_dict", "optimizer"):
        assert_same(ours[key], theirs[key], key)
    # Every parameter of every group (the model's and TempNet's) has its Adam moments.
    groups = theirs["optimizer"]["param_groups"]
    assert groups[-1]["name"] == "temperature"
    assert len(theirs["optimizer"]["state"]) == sum(len(g["params"]) for g in groups)


def test_webdataset_loader_leaves_the_main_generator_alone(workdir: Path) -> None:
    """The cause of the inexact resume: a persistent-worker loader draws its workers' base seed
    when its first iterator starts, i.e. in the first epoch a process runs. Drawn from the main
    generator, it shifted every later draw of the main process (dropout) in a resumed run.
    Built by openclip_tau.data, the loader draws from its own generator."""
    args = upstream_params.parse_args(
        ["--train-data", shard_pattern(workdir / "shards", NUM_SHARDS)]
        + ["--dataset-type", "webdataset", "--train-num-samples", "64", "--batch-size", "16"]
        + ["--workers", "2", "--seed", "0"]
    )
    args.distributed, args.world_size, args.rank = False, 1, 0
    info = tau_data.indexed_train_data(args, lambda image: image, 0, lambda text: [text])
    loader = info.dataloader
    assert loader.pipeline[0].persistent_workers  # webdataset's WebLoader wraps a DataLoader
    for epoch in range(2):
        info.set_epoch(epoch)
        torch.manual_seed(123)
        before = torch.get_rng_state()
        batches = list(loader)
        assert len(batches) == 4
        assert torch.equal(torch.get_rng_state(), before), f"epoch {epoch}"


# ---------------------------------------------------------------------------- seeds
SEEDS = range(4)
EPOCHS = range(4)


def assert_all_distinct(orders: dict[tuple[int, int], list]) -> None:
    seen: dict[tuple, tuple[int, int]] = {}
    for pair, order in orders.items():
        key = tuple(order)
        assert key not in seen, f"(seed, epoch) {pair} repeats the order of {seen[key]}"
        seen[key] = pair


def test_derived_seeds_differ_for_every_stream_and_tuple() -> None:
    streams = ("main", "worker", "samples", "shards", "resampled-shards", "sampler", "loader")
    seeds = {
        (stream, seed, epoch, rank): tau_data.derive_seed(stream, seed, epoch, rank)
        for stream, seed, epoch, rank in itertools.product(streams, SEEDS, EPOCHS, range(2))
    }
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds.values())
    # Negative and large integers are written out in full: no wrap-around collisions.
    assert tau_data.derive_seed("main", -1) != tau_data.derive_seed("main", 2**32 - 1)
    assert tau_data.derive_seed("main", 2**32) != tau_data.derive_seed("main", 0)


def test_no_two_seed_epoch_pairs_share_a_sampler_order() -> None:
    """csv under torchrun: the DistributedSampler's order (upstream's is seeded by seed + epoch,
    so seed 1's epoch 0 was seed 0's epoch 1), on both ranks; padding and split as upstream."""
    for rank in range(2):
        orders = {}
        for seed in SEEDS:
            sampler = tau_data.EpochSeededDistributedSampler(range(47), 2, rank, seed=seed)
            assert sampler.seed == seed
            for epoch in EPOCHS:
                sampler.set_epoch(epoch)
                orders[seed, epoch] = list(sampler)
        assert_all_distinct(orders)
    for seed, epoch in itertools.product(SEEDS, EPOCHS):
        both = []
        for rank in range(2):
            sampler = tau_data.EpochSeededDistributedSampler(range(47), 2, rank, seed=seed)
            sampler.set_epoch(epoch)
            both.append(list(sampler))
        assert len(both[0]) == len(both[1]) == 24  # 47 padded to 48, as upstream pads
        assert set(both[0] + both[1]) == set(range(47))
    no_shuffle = tau_data.EpochSeededDistributedSampler(range(6), 2, 1, shuffle=False, seed=1)
    assert list(no_shuffle) == [1, 3, 5]


def test_no_two_seed_epoch_pairs_share_a_shard_or_sample_order() -> None:
    """webdataset: the shard shuffle (upstream: seed + epoch), the resampled shard draw and the
    sample shuffle, for every (seed, epoch), in the main process (worker 0 of rank 0)."""
    urls = [f"shard-{i:02d}.tar" for i in range(40)]
    shard_orders, resampled, samples = {}, {}, {}
    for seed in SEEDS:
        epoch_store = upstream_data.SharedEpoch(0)
        shuffle = tau_data.EpochSeededShardShuffle(
            bufsize=100, initial=100, seed=seed, epoch=epoch_store
        )
        draw = tau_data.EpochSeededResampledShards(
            "shard-{00..39}.tar", seed=seed, epoch=epoch_store, nshards=40
        )
        sample_shuffle = tau_data.EpochSeededShuffle(100, 100, seed, epoch_store)
        for epoch in EPOCHS:
            epoch_store.set_value(epoch)
            shard_orders[seed, epoch] = list(shuffle.run(iter(urls)))
            resampled[seed, epoch] = [s["url"] for s in draw]
            samples[seed, epoch] = list(sample_shuffle.run(iter(range(60))))
            assert sorted(shard_orders[seed, epoch]) == urls
            assert sorted(samples[seed, epoch]) == list(range(60))
    for orders in (shard_orders, resampled, samples):
        assert_all_distinct(orders)
    # Deterministic: the same (seed, epoch) gives the same order whatever ran before.
    random.seed(99)
    again = tau_data.EpochSeededShardShuffle(100, 100, seed=2, epoch=upstream_data.SharedEpoch(3))
    assert list(again.run(iter(urls))) == shard_orders[2, 3]
