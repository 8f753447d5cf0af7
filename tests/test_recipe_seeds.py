"""The recipes' seeded streams: no two (seed, epoch) pairs share an order."""

from __future__ import annotations

import itertools

import pytest
from torch.utils.data import DistributedSampler

from recipes.seeds import SeededShuffleSampler, derive_seed

SEEDS = range(6)
EPOCHS = range(6)


def test_derived_seeds_differ_for_every_seed_purpose_and_epoch() -> None:
    keys = list(itertools.product(range(20), ("sampler", "probe", "loader"), range(20)))
    seeds = {derive_seed(seed, purpose, epoch) for seed, purpose, epoch in keys}
    assert len(seeds) == len(keys)
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(3, "sampler", 2) == derive_seed(3, "sampler", 2)  # reproducible
    assert derive_seed(2**40, "probe") != derive_seed(0, "probe")  # high bits count


@pytest.mark.parametrize("world", [1, 2])
def test_no_two_seed_epoch_pairs_share_an_order(world: int) -> None:
    data = range(40)
    orders = {}
    for seed, epoch in itertools.product(SEEDS, EPOCHS):
        shards = []
        for rank in range(world):
            sampler = SeededShuffleSampler(data, seed, num_replicas=world, rank=rank)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
            assert len(shards[-1]) == len(sampler) == 40 // world
        assert sorted(sum(shards, [])) == list(data)  # the ranks split one permutation
        orders[(seed, epoch)] = tuple(shards[0])
    assert len(set(orders.values())) == len(orders)


def test_torch_distributed_sampler_shares_orders_across_seeds() -> None:
    """Why the recipes do not use it: seed 1's epoch 0 is seed 0's epoch 1."""

    def order(seed: int, epoch: int) -> list[int]:
        sampler = DistributedSampler(range(40), num_replicas=2, rank=0, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1, 0) == order(0, 1)
    mine = SeededShuffleSampler(range(40), 1, num_replicas=2, rank=0)
    other = SeededShuffleSampler(range(40), 0, num_replicas=2, rank=0)
    other.set_epoch(1)
    assert list(mine) != list(other)


def test_longtail_probe_subset_has_its_own_stream(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from recipes.longtail import data

    seen = []
    original = data.balanced_indices

    def spy(targets, num_classes, per_class, seed):  # type: ignore[no-untyped-def]
        seen.append(seed)
        return original(targets, num_classes, per_class, seed)

    monkeypatch.setattr(data, "balanced_indices", spy)
    for data_seed in (0, 1):
        data.load_long_tail_data(
            "cifar10",
            tmp_path_factory.mktemp("data"),
            max_per_class=20,
            imbalance=10.0,
            probe_per_class=5,
            test_per_class=5,
            data_seed=data_seed,
            standin=True,
        )
    # test subset, probe subset for data seeds 0 and 1: the probe never reuses a data seed.
    assert seen[0] == 0 and seen[2] == 1
    assert seen[1] == derive_seed(0, "probe") and seen[3] == derive_seed(1, "probe")
    assert len(set(seen)) == 4
