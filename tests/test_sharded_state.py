"""The sharded per-sample state against the replicated one, in 2 and 4 gloo processes on CPU.

- Equivalence: every stateful loss (SogCLR, iSogCLR, their image-text forms) trained for several
  steps with the replicated state and with the sharded one (both exchanges: all_to_all and the
  all_gather fallback) gives bit-identical losses, input gradients and (gathered) tables, with an
  index repeated inside a rank's batch and across ranks; an eval-mode forward reads only.
- The state alone against a dictionary written from the rule "last occurrence in rank order,
  then batch order", with batches of different sizes on different ranks.
- Checkpoints: shard folders saved with 2 ranks resume with 4 (and saved with 4 into 3, and
  into one replicated process), replicated state dicts load into sharded states, and every bad
  input (missing shard, other sizes, other loss, no process group) raises naming the file and
  the sizes with the state unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist_utils import run_on_ranks
from torch import Tensor

from lightly_tau import ISogCLRLoss, SogCLRLoss
from openclip_tau import ISogCLRClipLoss, SogCLRClipLoss
from tau_core.state import (
    STATE_LAYOUTS,
    PerSampleState,
    ShardedPerSampleState,
    describe_state_memory,
    load_state_shards,
    make_state,
    save_state_shards,
    shard_file_name,
)

NUM_SAMPLES = 23  # not a multiple of 2, 3 or 4: shards of unequal sizes
LOCAL_BATCH = 5
DIM = 6
STEPS = 4
CASES = ("sogclr", "isogclr", "sogclr_clip", "isogclr_clip")
CLIP = ("sogclr_clip", "isogclr_clip")
EXCHANGES = ("all_to_all", "padded_all_to_all", "all_gather")
LAYOUTS = (("replicated", None),) + tuple(("sharded", e) for e in EXCHANGES)


def build(case: str, layout: str, rank: int = 0, world: int = 1, n: int = NUM_SAMPLES) -> Any:
    if case == "sogclr":
        return SogCLRLoss(
            n, temperature=0.2, gamma=0.7, gather_distributed=True, state_layout=layout
        )
    if case == "isogclr":
        return ISogCLRLoss(
            n,
            rho=0.4,
            tau_init=0.2,
            eta=0.5,
            beta=0.6,
            gamma=0.7,
            gather_distributed=True,
            state_layout=layout,
        )
    clip = {"rank": rank, "world_size": world, "state_layout": layout}
    if case == "sogclr_clip":
        return SogCLRClipLoss(n, temperature=0.1, gamma=0.7, **clip)
    return ISogCLRClipLoss(
        n, rho=1.0, tau_init=0.1, tau_min=0.02, eta=0.2, beta=0.6, gamma=0.7, **clip
    )


def schedule(world: int, seed: int) -> list[Tensor]:
    """Global batch indices per step: revisits, an index twice in rank 0's batch, and one index
    on the first and the last rank."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(STEPS):
        index = torch.randint(0, NUM_SAMPLES, (world * LOCAL_BATCH,), generator=g)
        index[1] = index[3]  # twice on rank 0
        index[-1] = index[0]  # rank 0 and the last rank
        steps.append(index)
    return steps


def run_steps(loss: Any, case: str, rank: int, world: int, seed: int) -> dict[str, Any]:
    """Trains on every step of ``schedule``; records values, input gradients, an eval read."""
    record: dict[str, Any] = {"loss": [], "objective": [], "grad": []}
    g = torch.Generator().manual_seed(seed + 100)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    for global_index in schedule(world, seed):
        a = torch.randn(len(global_index), DIM, generator=g)
        b = a + 0.7 * torch.randn(len(global_index), DIM, generator=g)
        x0 = a[rows].clone().requires_grad_(True)
        x1 = b[rows].clone().requires_grad_(True)
        index = global_index[rows]
        value = (
            loss(x0, x1, torch.tensor(10.0), index=index) if case in CLIP else loss(x0, x1, index)
        )
        value.backward()
        record["loss"].append(value.detach())
        record["objective"].append(loss.stats["objective"])
        record["grad"].append(torch.cat([x0.grad, x1.grad], dim=1))
    before = {n: loss.state.table(n) for n in loss.state.names}
    loss.eval()
    with torch.no_grad():
        index = schedule(world, seed + 1)[0][rows]
        x = torch.randn(LOCAL_BATCH * world, DIM, generator=g)[rows]
        args = (x, x.flip(0))
        value = loss(*args, torch.tensor(10.0), index=index) if case in CLIP else loss(*args, index)
    loss.train()
    record["eval_loss"] = value
    record["tables"] = {n: loss.state.table(n) for n in loss.state.names}
    record["eval_unchanged"] = all(torch.equal(before[n], record["tables"][n]) for n in before)
    return record


def state_alone(rank: int, world: int, exchange: str, n: int = NUM_SAMPLES) -> dict[str, Any]:
    """Writes and reads of the state with batches of different sizes per rank, against a
    dictionary that applies every write in rank order, then batch order."""
    state = ShardedPerSampleState(n, {"a": -math.inf, "b": 0.5}, exchange=exchange)
    g = torch.Generator().manual_seed(5)
    expected = {"a": [-math.inf] * n, "b": [0.5] * n}
    reads_ok = True
    for _ in range(3):
        # The padded exchange needs one batch size on every rank; the others take any sizes.
        sizes = (
            [7] * world if exchange == "padded_all_to_all" else [2 + 3 * r for r in range(world)]
        )
        batches = [torch.randint(0, n, (size,), generator=g) for size in sizes]
        values = [torch.randn(len(i), 2, generator=g) for i in batches]
        mine = batches[rank]
        rows = state.read(mine)
        for k, i in enumerate(mine.tolist()):
            reads_ok &= rows["a"][k].item() == expected["a"][i]  # -inf == -inf in Python
            reads_ok &= rows["b"][k].item() == expected["b"][i]
        state.write(mine, {"a": values[rank][:, 0], "b": values[rank][:, 1]})
        for index, value in zip(batches, values):  # rank order, then batch order
            for i, row in zip(index.tolist(), value.tolist()):
                expected["a"][i], expected["b"][i] = row
    return {
        "reads_ok": reads_ok,
        "tables": {n: state.table(n) for n in state.names},
        "expected": {n: torch.tensor(v) for n, v in expected.items()},
        "rows": state.shard("a").numel(),
        "owned": state.owned_index(),
    }


def errors_of(fn: Any) -> str:
    try:
        fn()
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        return f"{type(err).__name__}: {err}"
    return ""


def rank_main(rank: int, world: int, out: str, load_from: str) -> dict[str, Any]:
    """One process group: equivalence for every case and layout, the state alone, checkpoints."""
    out_dir = Path(out)
    result: dict[str, Any] = {"runs": {}}
    losses = {}
    for case in CASES:
        for layout, exchange in LAYOUTS:
            loss = build(case, layout, rank, world)
            if exchange:
                loss.state.exchange = exchange
            result["runs"][(case, layout, exchange)] = run_steps(loss, case, rank, world, seed=1)
            losses[(case, layout, exchange)] = loss
    result["alone"] = {e: state_alone(rank, world, e) for e in EXCHANGES}
    # Fewer samples than ranks: the last rank owns no row.
    result["tiny"] = {e: state_alone(rank, world, e, n=world - 1) for e in EXCHANGES}

    sharded = losses[("isogclr_clip", "sharded", "all_to_all")]
    replicated = losses[("isogclr_clip", "replicated", None)]
    result["memory_line"] = describe_state_memory(sharded)
    # Its own state dict loads back into the same rank; another rank's is refused.
    own = sharded.state_dict()
    fresh = build("isogclr_clip", "sharded", rank, world)
    fresh.load_state_dict(own)
    result["own_state_dict_ok"] = all(
        torch.equal(fresh.state.shard(n), sharded.state.shard(n)) for n in sharded.state.names
    )
    other = dict(
        own, **{"state.shard_info": torch.tensor([NUM_SAMPLES, world, (rank + 1) % world])}
    )
    before = fresh.state.shard("tau_image")
    result["other_rank_error"] = errors_of(lambda: fresh.load_state_dict(other))
    result["other_rank_unchanged"] = torch.equal(fresh.state.shard("tau_image"), before)
    # A replicated state dict (every row) loads into a sharded state: each rank keeps its rows.
    from_replicated = build("isogclr_clip", "sharded", rank, world)
    from_replicated.load_state_dict(replicated.state_dict())
    result["from_replicated_tables"] = {
        n: from_replicated.state.table(n) for n in from_replicated.state.names
    }

    save_state_shards(sharded, out_dir / f"sharded_w{world}")
    save_state_shards(replicated, out_dir / f"replicated_w{world}")
    if load_from:
        # Resume the other world size's save in both layouts, then train on.
        source = Path(load_from)
        resumed = {}
        for layout in ("sharded", "replicated"):
            for saved in ("sharded", "replicated"):
                loss = build("isogclr_clip", layout, rank, world)
                load_state_shards(loss, next(source.glob(f"{saved}_w*")))
                tables = {n: loss.state.table(n) for n in loss.state.names}
                run = run_steps(loss, "isogclr_clip", rank, world, seed=2)
                resumed[(layout, saved)] = {"loaded": tables, "run": run}
        result["resumed"] = resumed
        # Bad folders: nothing changes.
        loss = build("isogclr_clip", "sharded", rank, world)
        load_state_shards(loss, next(source.glob("sharded_w*")))
        before = {n: loss.state.shard(n) for n in loss.state.names}
        bad: dict[str, str] = {}
        bad["other_loss"] = errors_of(
            lambda: load_state_shards(loss, next(source.glob("wrong_loss_w*")))
        )
        bad["other_size"] = errors_of(
            lambda: load_state_shards(loss, next(source.glob("wrong_size_w*")))
        )
        result["bad"] = bad
        result["bad_unchanged"] = all(
            torch.equal(before[n], loss.state.shard(n)) for n in loss.state.names
        )
    else:
        result["bad"] = {}
    # Folders of another loss and of another size, for the bad-input checks of the next group.
    save_state_shards(
        build("sogclr_clip", "sharded", rank, world), out_dir / f"wrong_loss_w{world}"
    )
    save_state_shards(
        build("isogclr_clip", "sharded", rank, world, n=NUM_SAMPLES + 1),
        out_dir / f"wrong_size_w{world}",
    )
    return result


@pytest.fixture(scope="module")
def groups(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    """A group of 2 ranks that saves, then one of 4 that resumes the 2-rank save, then one of 3
    that resumes the 4-rank save (up, then down, to a size dividing neither)."""
    root = tmp_path_factory.mktemp("sharded")
    results: dict[int, Any] = {}
    previous = ""
    for world in (2, 4, 3):
        out = root / f"w{world}"
        out.mkdir()
        ranks = run_on_ranks(rank_main, out, str(out), previous, world_size=world)
        results[world] = {"ranks": ranks, "dir": out}
        previous = str(out)
    return results


# ------------------------------------------------------------- equivalence


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4, 3])
@pytest.mark.parametrize("case", CASES)
def test_sharded_equals_replicated_bit_for_bit(groups: dict[int, Any], world: int, case: str):
    for rank, result in enumerate(groups[world]["ranks"]):
        reference = result["runs"][(case, "replicated", None)]
        for exchange in EXCHANGES:
            got = result["runs"][(case, "sharded", exchange)]
            where = f"{case}, {exchange}, rank {rank} of {world}"
            for key in ("loss", "objective", "grad"):
                for step, (x, y) in enumerate(zip(got[key], reference[key])):
                    assert torch.equal(x, y), f"{key} of step {step}: {where}"
            assert torch.equal(got["eval_loss"], reference["eval_loss"]), where
            assert got["eval_unchanged"] and reference["eval_unchanged"], where
            assert set(got["tables"]) == set(reference["tables"])
            for name, table in reference["tables"].items():
                assert got["tables"][name].shape == (NUM_SAMPLES,)
                assert torch.equal(got["tables"][name], table), f"{name}: {where}"
        # The steps changed the tables (the comparison is not between two initial states).
        log_u = reference["tables"][next(n for n in reference["tables"] if "log_u" in n)]
        assert torch.isfinite(log_u).sum() >= LOCAL_BATCH


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4, 3])
def test_state_alone_follows_rank_then_batch_order(groups: dict[int, Any], world: int):
    owned = []
    for result in groups[world]["ranks"]:
        for exchange, alone in result["alone"].items():
            assert alone["reads_ok"], exchange
            for name, table in alone["expected"].items():
                assert torch.equal(alone["tables"][name], table), (exchange, name)
        owned.append(result["alone"]["all_to_all"]["owned"])
        assert result["alone"]["all_to_all"]["rows"] == len(owned[-1])
        for exchange, alone in result["tiny"].items():
            assert alone["reads_ok"], exchange
            for name, table in alone["expected"].items():
                assert torch.equal(alone["tables"][name], table), (exchange, name)
    assert groups[world]["ranks"][-1]["tiny"]["all_to_all"]["rows"] == 0
    # Every index is owned by exactly one rank; the shards differ by at most one row.
    assert sorted(torch.cat(owned).tolist()) == list(range(NUM_SAMPLES))
    assert max(map(len, owned)) - min(map(len, owned)) <= 1
    assert max(map(len, owned)) == math.ceil(NUM_SAMPLES / world)


# ------------------------------------------------------------- checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4, 3])
def test_state_dicts_in_a_group(groups: dict[int, Any], world: int):
    ranks = groups[world]["ranks"]
    reference = ranks[0]["runs"][("isogclr_clip", "replicated", None)]["tables"]
    for rank, result in enumerate(ranks):
        assert result["own_state_dict_ok"]
        assert f"holds shard {(rank + 1) % world} of {world}" in result["other_rank_error"]
        assert f"rank {rank} of {world}" in result["other_rank_error"]
        assert result["other_rank_unchanged"]
        for name, table in reference.items():
            assert torch.equal(result["from_replicated_tables"][name], table), name
    rows = math.ceil(NUM_SAMPLES / world)
    assert ranks[0]["memory_line"] == (
        f"per-sample state: 6 tables x {NUM_SAMPLES} samples, {4 * 6 * rows} B per rank "
        f"(sharded over {world})"
    )


@pytest.mark.slow
@pytest.mark.parametrize(("world", "saved_world"), [(4, 2), (3, 4)])
def test_resume_with_another_world_size(groups: dict[int, Any], world: int, saved_world: int):
    saved = groups[saved_world]["ranks"][0]["runs"]
    expected = saved[("isogclr_clip", "replicated", None)]["tables"]
    for rank, result in enumerate(groups[world]["ranks"]):
        resumed = result["resumed"]
        for key, entry in resumed.items():
            for name, table in expected.items():
                assert torch.equal(entry["loaded"][name], table), (key, name, rank)
        # The four resumed runs (either layout from either layout's save) train on identically.
        first = resumed[("replicated", "replicated")]["run"]
        for key, entry in resumed.items():
            for field in ("loss", "grad"):
                for x, y in zip(entry["run"][field], first[field]):
                    assert torch.equal(x, y), (key, field, rank)
            for name, table in first["tables"].items():
                assert torch.equal(entry["run"]["tables"][name], table), (key, name)
        assert not torch.equal(first["tables"]["tau_image"], expected["tau_image"])


@pytest.mark.slow
@pytest.mark.parametrize("world", [4, 3])
def test_bad_folders_in_a_group_change_nothing(groups: dict[int, Any], world: int):
    for result in groups[world]["ranks"]:
        assert "holds the tables ['log_u_image', 'log_u_text']" in result["bad"]["other_loss"]
        assert "another loss" in result["bad"]["other_loss"]
        assert f"{NUM_SAMPLES + 1} samples" in result["bad"]["other_size"]
        assert f"num_samples={NUM_SAMPLES}" in result["bad"]["other_size"]
        assert "index.json" in result["bad"]["other_size"]
        assert result["bad_unchanged"]


@pytest.mark.slow
def test_shards_load_into_one_replicated_process(groups: dict[int, Any]):
    expected = groups[4]["ranks"][0]["runs"][("isogclr_clip", "replicated", None)]["tables"]
    for layout in ("sharded", "replicated"):
        loss = build("isogclr_clip", "replicated")
        load_state_shards(loss, groups[4]["dir"] / f"{layout}_w4")
        for name, table in expected.items():
            assert torch.equal(loss.state.table(name), table), (layout, name)


@pytest.mark.slow
def test_a_missing_shard_is_named_and_nothing_is_loaded(groups: dict[int, Any], tmp_path: Path):
    folder = tmp_path / "copy"
    folder.mkdir()
    source = groups[2]["dir"] / "sharded_w2"
    for f in source.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / shard_file_name(1, 2)).unlink()
    loss = build("isogclr_clip", "replicated")
    with pytest.raises(FileNotFoundError, match=r"lists 2 shards.*shard-00001-of-00002\.pt"):
        load_state_shards(loss, folder)
    assert torch.equal(loss.state.table("tau_image"), torch.full((NUM_SAMPLES,), 0.1))
    (folder / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"index\.json is missing"):
        load_state_shards(loss, folder)


# ------------------------------------------------------------- one process, fast


def trained(case: str = "isogclr_clip", n: int = NUM_SAMPLES) -> Any:
    loss = build(case, "replicated", n=n)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        index = torch.randint(0, n, (6,), generator=g)
        a = torch.randn(6, DIM, generator=g, requires_grad=True)
        b = torch.randn(6, DIM, generator=g, requires_grad=True)
        value = loss(a, b, torch.tensor(10.0), index=index) if case in CLIP else loss(a, b, index)
        value.backward()
    return loss


def tables(loss: Any) -> dict[str, Tensor]:
    return {n: loss.state.table(n) for n in loss.state.names}


def test_layouts_and_the_sharded_layout_without_a_process_group():
    assert STATE_LAYOUTS == ("replicated", "sharded")
    with pytest.raises(
        ValueError, match=r"state_layout must be one of \['replicated', 'sharded'\]"
    ):
        make_state("striped", 10, {"a": 0.0})
    with pytest.raises(ValueError, match="exchange must be one of"):
        ShardedPerSampleState(10, {"a": 0.0}, exchange="broadcast")
    state = make_state("sharded", 10, {"a": 0.0})
    assert isinstance(state, ShardedPerSampleState) and "not yet sharded" in repr(state)
    for case in CASES:  # every stateful loss takes the layout; the first access needs a group
        loss = build(case, "sharded")
        assert isinstance(loss.state, ShardedPerSampleState)
        a = torch.randn(4, DIM, requires_grad=True)
        with pytest.raises(RuntimeError, match="init_process_group"):
            loss(a, a, torch.tensor(10.0), index=[0, 1, 2, 3]) if case in CLIP else loss(
                a, a, [0, 1, 2, 3]
            )
    for access in (
        lambda: state.read(torch.tensor([1])),
        lambda: state.write(torch.tensor([1]), {"a": torch.zeros(1)}),
        lambda: state.table("a"),
        state.state_dict,
        lambda: load_state_shards(state, "nowhere"),
    ):
        with pytest.raises(RuntimeError, match="state_layout='sharded'.*no"):
            access()


def test_describe_state_memory_arithmetic():
    laion = 414_080_000
    assert describe_state_memory(make_state("sharded", laion, dict.fromkeys("abcdef", 0.0)), 8) == (
        "per-sample state: 6 tables x 414,080,000 samples, 1.24 GB per rank (sharded over 8)"
    )
    assert describe_state_memory(ISogCLRClipLoss(2_800_000), 4) == (
        "per-sample state: 6 tables x 2,800,000 samples, 67.20 MB per rank "
        "(replicated on each of 4 ranks)"
    )
    assert describe_state_memory(SogCLRLoss(1000)) == (
        "per-sample state: 1 tables x 1,000 samples, 4.00 kB per rank (replicated, one process)"
    )


def test_shard_folder_round_trip_and_bad_folders_in_one_process(tmp_path: Path):
    source = trained()
    folder = save_state_shards(source, tmp_path / "w1")
    index = json.loads((folder / "index.json").read_text())
    assert index["world_size"] == 1 and index["shards"] == [shard_file_name(0, 1)]
    assert index["loss"] == "ISogCLRClipLoss" and index["num_samples"] == NUM_SAMPLES
    target = build("isogclr_clip", "replicated")
    load_state_shards(target, folder)
    for name, table in tables(source).items():
        assert torch.equal(target.state.table(name), table), name

    fresh = build("isogclr_clip", "replicated")
    initial = tables(fresh)

    def unchanged() -> bool:
        return all(torch.equal(t, initial[n]) for n, t in tables(fresh).items())

    save_state_shards(trained(n=NUM_SAMPLES + 2), tmp_path / "bigger")
    with pytest.raises(ValueError, match=rf"index\.json holds .* of {NUM_SAMPLES + 2} samples.*"):
        load_state_shards(fresh, tmp_path / "bigger")
    save_state_shards(trained("sogclr_clip"), tmp_path / "sogclr")
    with pytest.raises(ValueError, match=r"index\.json holds the tables .*another loss"):
        load_state_shards(fresh, tmp_path / "sogclr")
    # Same tables, another loss class: the unimodal iSogCLR with the image-text table names.
    (tmp_path / "renamed").mkdir()
    shard = torch.load(folder / shard_file_name(0, 1), weights_only=True)
    torch.save(dict(shard, loss="ISogCLRLoss"), tmp_path / "renamed" / shard_file_name(0, 1))
    (tmp_path / "renamed" / "index.json").write_text(json.dumps(dict(index, loss="ISogCLRLoss")))
    with pytest.raises(ValueError, match=r"state of a ISogCLRLoss; this loss is a ISogCLRClipLoss"):
        load_state_shards(fresh, tmp_path / "renamed")
    # A shard cut short: named with its rows, found before anything is copied.
    shard["rows"]["tau_text"] = shard["rows"]["tau_text"][:-1]
    torch.save(shard, folder / shard_file_name(0, 1))
    with pytest.raises(
        ValueError,
        match=rf"shard-00000-of-00001\.pt: table 'tau_text' has shape "
        rf"\({NUM_SAMPLES - 1},\).*has {NUM_SAMPLES} rows",
    ):
        load_state_shards(fresh, folder)
    assert unchanged()


def test_replicated_state_refuses_one_shard_of_several():
    state = PerSampleState(5, {"a": 0.0})
    shard = {"shard_info": torch.tensor([5, 2, 1]), "shard.a": torch.ones(2)}
    with pytest.raises(ValueError, match=r"holds shard 1 of 2 .*load_state_shards"):
        state.load_state_dict(shard)
    assert torch.equal(state.table("a"), torch.zeros(5))
    # A shard of one (a sharded state in a group of one) holds every row and loads.
    state.load_state_dict({"shard_info": torch.tensor([5, 1, 0]), "shard.a": torch.ones(5)})
    assert torch.equal(state.table("a"), torch.ones(5))
