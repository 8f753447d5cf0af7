"""CPU tests of the per-sample state: storage, checkpoints, dtype casts, duplicates, eval mode,
index types, and the dataset wrapper that supplies the index."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
import torchvision
from lightly.data import LightlyDataset
from lightly.transforms import SimCLRTransform
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from lightly_tau import IndexedDataset, ISogCLRLoss, PerSampleState, SogCLRLoss
from openclip_tau import ISogCLRClipLoss, SogCLRClipLoss
from tau_core.state import keep_last_occurrence as _keep_last_occurrence

DIM = 6

LOSSES = {
    "sogclr": lambda n: SogCLRLoss(n, temperature=0.2, gamma=0.7),
    "isogclr": lambda n: ISogCLRLoss(n, rho=0.3, tau_init=0.2, eta=0.1, gamma=0.7),
    "sogclr_clip": lambda n: SogCLRClipLoss(n, temperature=0.1, gamma=0.7),
    "isogclr_clip": lambda n: ISogCLRClipLoss(
        n, rho=1.0, tau_init=0.1, tau_min=0.01, eta=0.1, gamma=0.7
    ),
}
KINDS = sorted(LOSSES)


def features(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, DIM, generator=g)
    return a, a + 0.8 * torch.randn(batch, DIM, generator=g)


def step(loss, seed: int, index, dtype: torch.dtype = torch.float32):
    """One call with features from ``seed``: value and input gradients."""
    a, b = features(len(index), seed)
    a = a.to(dtype).requires_grad_(True)
    b = b.to(dtype).requires_grad_(True)
    if isinstance(loss, (SogCLRClipLoss, ISogCLRClipLoss)):
        value = loss(a, b, torch.tensor(10.0), index=index)
    else:
        value = loss(a, b, index)
    value.backward()
    return value.detach(), a.grad, b.grad


def tables(loss) -> dict[str, torch.Tensor]:
    return {name: loss.state.table(name) for name in loss.state.names}


def assert_same_tables(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> None:
    assert set(x) == set(y)
    for name in x:
        assert x[name].dtype == y[name].dtype == torch.float32, name
        assert torch.equal(x[name], y[name]), name


def assert_same_step(x, y) -> None:
    for got, want in zip(x, y):
        assert torch.equal(got, want)


# ------------------------------------------------------------- PerSampleState


def test_tables_start_at_their_initial_values_and_are_copied_out():
    state = PerSampleState(5, {"log_u": -math.inf, "tau": 0.1})
    assert state.names == ["log_u", "tau"] and state.num_samples == 5
    assert torch.equal(state.table("log_u"), torch.full((5,), -math.inf))
    assert torch.equal(state.table("tau"), torch.full((5,), 0.1))
    assert state.table("tau").dtype == torch.float32
    state.table("tau")[0] = 7.0  # a copy: the state does not change
    assert state.table("tau")[0].item() == pytest.approx(0.1)
    assert len(list(state.parameters())) == 0 and len(list(state.buffers())) == 0


def test_read_and_write_touch_only_the_given_rows():
    state = PerSampleState(6, {"a": 0.0, "b": 1.0})
    index = torch.tensor([4, 1], dtype=torch.int32)
    state.write(index, {"a": torch.tensor([5.0, 6.0]), "b": torch.tensor([7.0, 8.0])})
    assert state.table("a").tolist() == [0.0, 6.0, 0.0, 0.0, 5.0, 0.0]
    assert state.table("b").tolist() == [1.0, 8.0, 1.0, 1.0, 7.0, 1.0]
    rows = state.read(torch.tensor([1, 4, 4]))
    assert rows["a"].tolist() == [6.0, 5.0, 5.0] and rows["b"].dtype == torch.float32
    with pytest.raises(ValueError, match=r"write needs rows for \['a', 'b'\]"):
        state.write(index, {"a": torch.zeros(2)})
    state.reset()
    assert state.table("a").tolist() == [0.0] * 6 and state.table("b").tolist() == [1.0] * 6


def test_write_keeps_the_last_occurrence_of_a_duplicated_index():
    state = PerSampleState(6, {"a": 0.0})
    state.write(torch.tensor([4, 1, 4, 4, 1]), {"a": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])})
    assert state.table("a").tolist() == [0.0, 5.0, 0.0, 0.0, 4.0, 0.0]
    # Many duplicates in random order against a plain dictionary (last assignment wins).
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 50, (1000,), generator=g)
    values = torch.randn(1000, 2, generator=g)
    expected = {}
    for i, row in zip(index.tolist(), values):
        expected[i] = row
    out_index, out_rows = _keep_last_occurrence(index, values)
    assert sorted(out_index.tolist()) == sorted(index.tolist())
    for i, row in zip(out_index.tolist(), out_rows):
        assert torch.equal(row, expected[i])


@pytest.mark.parametrize("num_samples", [0, -5, 2.5, True, "10", None])
def test_state_needs_a_positive_integer_size(num_samples):
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        PerSampleState(num_samples, {"a": 0.0})


def test_state_needs_a_table():
    with pytest.raises(ValueError, match="initial_values"):
        PerSampleState(3, {})


def test_check_index_converts_and_rejects():
    state = PerSampleState(10, {"a": 0.0})
    for index in (torch.tensor([1, 2], dtype=torch.int32), [1, 2], np.array([1, 2])):
        out = state.check_index(index, 2)
        assert out.dtype == torch.int64 and out.tolist() == [1, 2]
    with pytest.raises(ValueError, match="index is empty"):
        state.check_index(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="index must be a tensor of integers"):
        state.check_index(["a", "b"])
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        state.check_index([1, 2], 2, {"x": torch.tensor([0.0, math.nan])})


# ------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_then_identical_steps(kind):
    loss = LOSSES[kind](10)
    loss.set_epoch(3)
    step(loss, 0, torch.tensor([1, 4, 7, 2]))
    step(loss, 1, torch.tensor([4, 9, 1, 0]))
    saved = loss.state_dict()
    for name in loss.state.names:
        assert saved[f"state.{name}"].shape == (10,)
        assert saved[f"state.{name}"].dtype == torch.float32
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)

    restored = LOSSES[kind](10)
    result = restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_tables(tables(restored), tables(loss))
    assert restored.epoch == 3 and restored.current_gamma == loss.current_gamma
    for seed, index in ((2, [0, 1, 2, 3]), (3, [9, 8, 1, 1])):
        assert_same_step(
            step(restored, seed, torch.tensor(index)), step(loss, seed, torch.tensor(index))
        )
        assert_same_tables(tables(restored), tables(loss))


def test_state_round_trip_inside_a_model_is_strict():
    """A model holding the loss (as a LightningModule does) reloads its own checkpoint strictly."""

    def model():
        return torch.nn.ModuleDict(
            {"head": torch.nn.Linear(DIM, DIM), "loss": LOSSES["isogclr"](8)}
        )

    source, target = model(), model()
    step(source["loss"], 0, torch.tensor([0, 3, 5]))
    target.load_state_dict(source.state_dict())  # strict=True
    assert_same_tables(tables(target["loss"]), tables(source["loss"]))


def test_isogclr_state_is_at_most_16_bytes_per_sample():
    n = 1000
    loss = ISogCLRLoss(n)
    total = sum(
        t.numel() * t.element_size() for t in loss.state_dict().values() if torch.is_tensor(t)
    )
    assert total <= 16 * n


@pytest.mark.parametrize("kind", KINDS)
def test_loading_another_num_samples_fails_and_changes_nothing(kind):
    source = LOSSES[kind](10)
    source.set_epoch(4)
    step(source, 0, torch.tensor([1, 2, 3]))
    target = LOSSES[kind](12)
    target.set_epoch(1)
    step(target, 1, torch.tensor([5, 11, 0]))
    before = tables(target)
    with pytest.raises(ValueError, match=r"num_samples=12.*made for 10 samples"):
        target.load_state_dict(source.state_dict())
    assert_same_tables(tables(target), before)
    assert target.epoch == 1


def test_loading_a_table_of_another_shape_fails():
    state = PerSampleState(4, {"a": 0.0})
    with pytest.raises(ValueError, match=r"shape \(2, 2\).*num_samples=4"):
        state.load_state_dict({"a": torch.zeros(2, 2)})
    assert torch.equal(state.table("a"), torch.zeros(4))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "cast",
    [
        lambda m: m.half(),
        lambda m: m.to(torch.bfloat16),
        lambda m: m.double(),
        lambda m: m.to("cpu", torch.float16),
    ],
    ids=["half", "to_bfloat16", "double", "to_cpu_float16"],
)
def test_dtype_casts_leave_tables_float32(kind, cast):
    loss = LOSSES[kind](8)
    step(loss, 0, torch.tensor([0, 1, 2]))
    before = tables(loss)
    assert cast(loss) is loss
    assert_same_tables(tables(loss), before)
    # The loss still works on half-precision features and writes float32 rows.
    value, _, _ = step(loss, 1, torch.tensor([2, 3, 4]), dtype=torch.bfloat16)
    assert torch.isfinite(value)
    for name, table in tables(loss).items():
        assert table.dtype == torch.float32 and torch.isfinite(table[[2, 3, 4]]).all(), name


# ------------------------------------------------------------- behaviour in a step


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_batch_rows_change(kind):
    loss = LOSSES[kind](20)
    initial = tables(loss)
    index = [3, 17, 8, 0]
    step(loss, 0, torch.tensor(index))
    others = [i for i in range(20) if i not in index]
    for name, table in tables(loss).items():
        assert torch.equal(table[others], initial[name][others]), name
        if name.startswith("log_u"):
            assert torch.isfinite(table[index]).all()
        if name.startswith("momentum"):
            assert (table[index] != 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_duplicated_index_writes_its_last_occurrence(kind):
    """Each occurrence is computed from the stored rows; the last one in the batch is written.

    So a batch with index 2 twice gives exactly what a batch with a stand-in index 9 at the
    first occurrence gives, when 9 starts from the same stored rows as 2: the same value and
    gradients, the same rows for 2, 5 and 7, and 9's update is simply dropped.
    """
    dup, distinct = LOSSES[kind](12), LOSSES[kind](12)
    for loss in (dup, distinct):
        step(loss, 0, torch.tensor([2, 0, 1, 3]))  # so that 2 is a revisit (gamma < 1)
    copied = distinct.state_dict()
    for name in distinct.state.names:
        copied[f"state.{name}"][9] = copied[f"state.{name}"][2]
    distinct.load_state_dict(copied)
    stored = tables(dup)

    assert_same_step(
        step(dup, 1, torch.tensor([2, 5, 2, 7])), step(distinct, 1, torch.tensor([9, 5, 2, 7]))
    )
    got, want = tables(dup), tables(distinct)
    for name in got:
        assert torch.equal(got[name][[2, 5, 7]], want[name][[2, 5, 7]]), name
        assert torch.equal(got[name][9], stored[name][9]), name  # 9 was not in dup's batch
    # The two occurrences were different updates, so which one is kept matters.
    first_table = distinct.state.names[0]
    assert not torch.equal(want[first_table][9], want[first_table][2])


@pytest.mark.parametrize("kind", KINDS)
def test_eval_mode_reads_but_does_not_write(kind):
    loss = LOSSES[kind](10)
    step(loss, 0, torch.tensor([1, 2, 3]))
    twin = copy.deepcopy(loss)
    before = tables(loss)
    loss.eval()
    evaluated = step(loss, 1, torch.tensor([2, 3, 4]))
    assert_same_tables(tables(loss), before)
    # Same value and gradient as a training step from the same state.
    assert_same_step(evaluated, step(twin, 1, torch.tensor([2, 3, 4])))
    assert not torch.equal(tables(twin)[loss.state.names[0]], before[loss.state.names[0]])
    loss.train()
    step(loss, 1, torch.tensor([2, 3, 4]))
    assert_same_tables(tables(loss), tables(twin))


@pytest.mark.parametrize("kind", KINDS)
def test_index_types_give_identical_results(kind):
    reference = LOSSES[kind](10)
    expected = step(reference, 0, torch.tensor([7, 2, 5]))
    for index in (
        torch.tensor([7, 2, 5], dtype=torch.int32),
        torch.tensor([7, 2, 5], dtype=torch.int16),
        [7, 2, 5],
        np.array([7, 2, 5]),
    ):
        loss = LOSSES[kind](10)
        assert_same_step(step(loss, 0, index), expected)
        assert_same_tables(tables(loss), tables(reference))


# ------------------------------------------------------------- IndexedDataset


class _Pairs(torch.utils.data.Dataset):
    """Returns a bare tensor per item (not a tuple)."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((2,), float(i))


def test_indexed_dataset_with_a_torchvision_dataset_and_simclr_transform():
    base = torchvision.datasets.FakeData(
        size=6, image_size=(3, 16, 16), num_classes=3, transform=SimCLRTransform(input_size=16)
    )
    dataset = IndexedDataset(base)
    assert len(dataset) == 6 and dataset.transform is base.transform
    (x0, x1), target, i = dataset[4]
    assert i == 4 and x0.shape == x1.shape == (3, 16, 16) and target == base[4][1]

    loader = DataLoader(dataset, batch_size=3, shuffle=False)
    loss = SogCLRLoss(num_samples=len(dataset))
    seen = []
    for (x0, x1), targets, index in loader:
        assert index.dtype == torch.int64 and targets.shape == (3,)
        seen += index.tolist()
        value = loss(x0.flatten(1).requires_grad_(), x1.flatten(1).requires_grad_(), index)
        assert torch.isfinite(value)
        value.backward()  # the rows are written when the backward pass reaches the loss
    assert seen == list(range(6))
    assert torch.isfinite(loss.state.table("log_u")).all()


def test_indexed_dataset_with_a_lightly_dataset(tmp_path):
    for k in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * k, dtype=np.uint8)).save(tmp_path / f"img_{k}.png")
    base = LightlyDataset(input_dir=str(tmp_path), transform=torchvision.transforms.ToTensor())
    dataset = IndexedDataset(base)
    sample, target, fname, i = dataset[2]
    assert i == 2 and fname == base.get_filenames()[2] and sample.shape == (3, 8, 8)
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert len(batch) == 4
    assert batch[-1].dtype == torch.int64 and batch[-1].tolist() == [0, 1, 2, 3]
    assert list(batch[2]) == base.get_filenames()


def test_indexed_dataset_with_non_tuple_items():
    dataset = IndexedDataset(_Pairs())
    item, i = dataset[3]
    assert i == 3 and torch.equal(item, torch.full((2,), 3.0))
    items, index = next(iter(DataLoader(dataset, batch_size=5)))
    assert items.shape == (5, 2) and index.dtype == torch.int64 and index.tolist() == list(range(5))


def test_indexed_dataset_needs_a_map_style_dataset():
    class Stream(IterableDataset):
        def __iter__(self):
            yield 1

    with pytest.raises(TypeError, match="map-style"):
        IndexedDataset(Stream())
