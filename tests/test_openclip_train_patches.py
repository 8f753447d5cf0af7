"""``openclip_tau.train.patches``: every replaced ``open_clip_train`` name is installed for the
run and restored afterwards (also after an error), and a name upstream no longer has is refused
before anything is replaced."""

from __future__ import annotations

import open_clip_train.main as upstream_main
import pytest
import torch
from open_clip_train import data as upstream_data
from open_clip_train import zero_shot as upstream_zero_shot

from openclip_tau import train
from openclip_tau.train import patches


def _run() -> train.LossTraining:
    options, _ = train.parse_loss_args(["--loss", "isogclr"])
    return train.LossTraining(options)


def _current(table: dict) -> dict:
    return {(m, name): getattr(m, name) for m, names in table.items() for name in names}


def test_every_listed_name_is_replaced_for_the_run_and_restored() -> None:
    run = _run()
    table = patches.replacements(run)
    assert set(table) == {upstream_main, upstream_data, upstream_zero_shot}
    before = _current(table)
    with pytest.raises(RuntimeError, match="inside"):
        with run.installed():
            for (module, name), value in _current(table).items():
                if name != "torch":
                    assert value == table[module][name], name
            assert upstream_main.torch is not torch
            assert upstream_main.torch.save == run.save
            assert upstream_main.torch.load is torch.load  # the rest passes through
            ddp = upstream_main.torch.nn.parallel.DistributedDataParallel
            assert ddp is patches.distributed_data_parallel
            raise RuntimeError("inside")
    after = _current(table)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert upstream_main.torch is torch


def test_a_name_upstream_lost_is_refused_before_anything_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = _run()
    parse_args = upstream_main.parse_args
    monkeypatch.delattr(upstream_zero_shot, "accuracy")
    with pytest.raises(train.UpstreamDriftError, match="open_clip_train.zero_shot has no accuracy"):
        with run.installed():
            pass
    assert upstream_main.parse_args is parse_args
