"""``openclip_tau.train`` with ``--loss rgclg``, ``--loss tempnet`` and ``--tau-state sharded``.

End-to-end runs use the tiny model on CPU in this process (fp32, one thread, full-image crop),
as ``test_openclip_train.py`` does; the sharded layout runs in 2 ``torchrun`` processes (gloo).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from open_clip_train import train as upstream_train
from openclip_fixtures import (
    NO_CROP_AUGMENTATION,
    TINY_MODEL,
    TINY_MODEL_CONFIG,
    loss_values,
    register_tiny_model,
    shard_pattern,
    torchrun_train,
    write_shards,
)

from openclip_tau import train

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
NUM_SAMPLES = 256
PER_SHARD = 64
NUM_SHARDS = NUM_SAMPLES // PER_SHARD
BATCH = 32
TABLE = NUM_SHARDS * 10**4  # integer img2dataset keys: shard * 10**4 + position
# Learning rates large enough that the temperature moves visibly in a few steps of batch 32.
LOSS_ARGS = {
    "rgclg": ["--loss", "rgclg", "--tau-num-samples", str(TABLE), "--tau-lr", "1e-2"],
    "tempnet": ["--loss", "tempnet", "--tau-num-samples", str(TABLE), "--tau-lr", "1e-3"],
}
LOSS_ARGS["tempnet"] += ["--tau-rho", "1.5", "--tau-prototypes", "16"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("openclip_newlosses")
    register_tiny_model(root)
    write_shards(root / "shards", NUM_SAMPLES, PER_SHARD)
    return root


def common_args(root: Path, name: str, epochs: int = 2, samples: int = 128) -> list[str]:
    return [
        *("--model", TINY_MODEL, "--train-data", shard_pattern(root / "shards", NUM_SHARDS)),
        *("--dataset-type", "webdataset", "--train-num-samples", str(samples)),
        *("--batch-size", str(BATCH), "--epochs", str(epochs), "--lr", "5e-4", "--warmup", "1"),
        *("--lr-scheduler", "const", "--workers", "0", "--device", "cpu", "--precision", "fp32"),
        *("--seed", "0", "--log-every-n-steps", "1", "--logs", str(root / "logs")),
        *("--name", name, *NO_CROP_AUGMENTATION),
    ]


def run(root: Path, name: str, loss_args: list[str], extra: list[str] = (), **kw) -> Path:
    shutil.rmtree(root / "logs" / name, ignore_errors=True)
    assert train.main(loss_args + common_args(root, name, **kw) + list(extra)) is None
    return root / "logs" / name


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def temperature_group(saved: dict) -> tuple[dict, list[dict]]:
    """The saved optimizer's temperature group and the Adam state of its parameters."""
    groups = [g for g in saved["optimizer"]["param_groups"] if g.get("name") == "temperature"]
    assert len(groups) == 1, saved["optimizer"]["param_groups"]
    return groups[0], [saved["optimizer"]["state"][p] for p in groups[0]["params"]]


def visited_median(state: dict) -> torch.Tensor:
    """Reference: median of the visited image and text temperatures pooled (linear interp.)."""
    pooled = [
        state[f"state.tau_{role}"][torch.isfinite(state[f"state.log_u_{role}"])]
        for role in ("image", "text")
    ]
    return torch.quantile(torch.cat(pooled).double(), 0.5).float()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical values, NaN where the other has NaN (TempNet's unvisited rows)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def assert_same(ours: dict, theirs: dict, what: str) -> None:
    assert ours.keys() == theirs.keys(), what
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert same(ours[key], value), f"{what}: {key}"
        else:
            assert ours[key] == value, f"{what}: {key}"


class Killed(Exception):
    pass


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.parametrize("loss", ["rgclg", "tempnet"])
def test_new_loss_trains_checkpoints_and_resumes_exactly(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, loss: str
) -> None:
    """Two epochs straight vs. killed at the start of epoch 1 and resumed with --resume latest:
    the loss state (tables, temperature parameters, epoch), the model and the optimizer's
    temperature group (Adam moments, step) are bit-identical; logit_scale is calibrated."""
    loss_args = LOSS_ARGS[loss]
    straight = run(workdir, f"{loss}-straight", loss_args)

    name = f"{loss}-killed"
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
    killed = workdir / "logs" / name
    assert os.listdir(killed / "checkpoints") == ["epoch_1.pt"]
    assert train.main(loss_args + common_args(workdir, name) + ["--resume", "latest"]) is None

    theirs = checkpoint(straight / "checkpoints" / "epoch_2.pt")
    ours = checkpoint(killed / "checkpoints" / "epoch_2.pt")
    assert_same(ours["loss_state_dict"], theirs["loss_state_dict"], "loss_state_dict")
    assert_same(ours["state_dict"], theirs["state_dict"], "model")
    group, moments = temperature_group(theirs)
    resumed_group, resumed_moments = temperature_group(ours)
    assert group == resumed_group
    for a, b in zip(moments, resumed_moments):
        assert_same(a, b, "temperature group's Adam state")
    # The model's groups were resumed too (upstream loads them; our load keeps them).
    for p, value in theirs["optimizer"]["state"].items():
        assert_same(ours["optimizer"]["state"][p], value, f"optimizer state {p}")
    resumed_log = (killed / "out.log").read_text()
    assert resumed_log.count(f"restored the {loss} loss state") == 1
    assert resumed_log.count("restored the optimizer state of the temperature group") == 1

    # What the checkpoint holds.
    first = checkpoint(straight / "checkpoints" / "epoch_1.pt")
    state = theirs["loss_state_dict"]
    assert theirs["loss_name"] == loss and state["_extra_state"] == {"epoch": 1}
    options = theirs["loss_options"]
    assert options["class"] == {"rgclg": "RGCLGClipLoss", "tempnet": "TempNetClipLoss"}[loss]
    assert options["state_layout"] == "replicated" and "state_shards" not in options
    visited = torch.isfinite(state["state.log_u_image"])
    assert visited.shape == (TABLE,) and visited.sum() >= 128
    parameters = [k for k in state if k.startswith(("global_temperature.", "temperature_net"))]
    parameters = [k for k in parameters if not k.endswith("_extra_state")]  # dropout counter
    assert len(moments) == len(parameters) == {"rgclg": 1, "tempnet": 12}[loss]
    assert all(int(m["step"]) == 8 for m in moments)  # 2 epochs x 4 steps, every step
    log = (straight / "out.log").read_text()
    assert "openclip_tau: per-sample state: " in log and "(replicated, one process)" in log
    if loss == "rgclg":
        # One global temperature: lr_tau, weight decay 0, the model's betas; it moved.
        assert group["lr"] == 1e-2 and group["weight_decay"] == 0.0
        assert group["betas"] == theirs["optimizer"]["param_groups"][0]["betas"]
        scale = state["global_temperature.logit_scale"]
        first_scale = first["loss_state_dict"]["global_temperature.logit_scale"]
        assert scale != first_scale and scale != torch.tensor(math.log(1 / 0.07))
        tau = math.exp(-scale.item())
        assert 0.01 <= tau <= 1.0
        assert options["class_kwargs"]["lr_tau"] == 1e-2
        assert options["class_kwargs"]["rho"] == 6.5  # the class default, recorded
        # The model's logit_scale is the loss's parameter: exp(logit_scale) == 1 / tau.
        assert torch.equal(theirs["state_dict"]["logit_scale"], scale)
        assert math.exp(theirs["state_dict"]["logit_scale"].item()) == pytest.approx(1 / tau)
        assert "tau: " in log  # the global temperature, every logged step
    else:
        # TempNet: the networks' own Adam settings, dim = the model's embed_dim.
        assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
        assert group["lr"] == pytest.approx(1e-3 * 0.9)  # lr_tau * 0.9 ** epoch, epoch 1
        assert options["class_kwargs"]["dim"] == TINY_MODEL_CONFIG["embed_dim"]
        assert options["class_kwargs"]["tau_min"] == 0.005
        assert options["class_kwargs"]["tau_max"] == 0.05
        key = "temperature_networks.image.proj.weight"
        assert not torch.equal(state[key], first["loss_state_dict"][key])
        tau = state["state.tau_image"]
        assert torch.isnan(tau[~visited]).all()
        assert ((tau[visited] >= 0.005) & (tau[visited] <= 0.05)).all()
        expected = torch.log(1.0 / visited_median(state))
        torch.testing.assert_close(theirs["state_dict"]["logit_scale"], expected, rtol=0, atol=1e-6)
        assert "table_tau_image_p50" in log
    values = loss_values(straight / "out.log")
    assert len(values) == 8 and all(math.isfinite(v) for v in values)


def torchrun(root: Path, name: str, loss_args: list[str], extra: list[str] = ()) -> Path:
    shutil.rmtree(root / "logs" / name, ignore_errors=True)
    torchrun_train(root, [*loss_args, *common_args(root, name, epochs=1), *extra])
    return root / "logs" / name


@pytest.mark.slow
def test_sharded_state_in_two_processes_equals_replicated_and_resumes_in_one(
    workdir: Path,
) -> None:
    """TempNet (tables, networks and their optimizer group) in 2 gloo processes: one epoch with
    --tau-state sharded gives the tables of --tau-state replicated bit for bit; its checkpoint
    (shard folder) resumes in one process, re-sharded, exactly as the replicated checkpoint."""
    loss_args = LOSS_ARGS["tempnet"]
    sharded = torchrun(workdir, "sharded-2", loss_args, ["--tau-state", "sharded"])
    replicated = torchrun(workdir, "replicated-2", loss_args)

    log = (sharded / "out.log").read_text()
    assert "per-sample state: 4 tables x 40,000 samples, 320.00 kB per rank (sharded over 2)" in log
    assert "per-sample state sharded over 2 ranks: no cross-rank comparison" in log
    assert "per-sample state identical on all 2 ranks" not in log
    replicated_log = (replicated / "out.log").read_text()
    assert "640.00 kB per rank (replicated on each of 2 ranks)" in replicated_log
    assert "per-sample state identical on all 2 ranks" in replicated_log
    # The same whole-table statistics (the shards' visited rows, gathered).
    table_line = [line for line in log.splitlines() if "Table stats" in line]
    assert (
        table_line
        and table_line[-1].split("Table stats")[1]
        == (
            [line for line in replicated_log.splitlines() if "Table stats" in line][-1].split(
                "Table stats"
            )[1]
        )
    )

    saved = checkpoint(sharded / "checkpoints" / "epoch_1.pt")
    full = checkpoint(replicated / "checkpoints" / "epoch_1.pt")
    assert saved["loss_options"]["state_layout"] == "sharded"
    assert saved["loss_options"]["state_shards"] == "epoch_1.tau_state"
    assert not any(k.startswith("state.") for k in saved["loss_state_dict"])
    folder = sharded / "checkpoints" / "epoch_1.tau_state"
    assert sorted(os.listdir(folder)) == [
        "index.json",
        "shard-00000-of-00002.pt",
        "shard-00001-of-00002.pt",
    ]
    # The shards put together are the replicated run's tables, bit for bit.
    shards = [
        torch.load(folder / f"shard-0000{r}-of-00002.pt", weights_only=True) for r in range(2)
    ]
    for name in ("log_u_image", "tau_image", "log_u_text", "tau_text"):
        table = torch.empty(TABLE)
        for r, shard in enumerate(shards):
            table[r::2] = shard["rows"][name]
        assert same(table, full["loss_state_dict"][f"state.{name}"]), name
    rest = {k: v for k, v in full["loss_state_dict"].items() if not k.startswith("state.")}
    assert_same(saved["loss_state_dict"], rest, "loss_state_dict without tables")
    for key, value in full["state_dict"].items():
        assert torch.equal(saved["state_dict"][key], value), key

    # Resumed in one process, replicated: from the shards, as from the full tables.
    from_shards = run(
        workdir,
        "resume-shards",
        loss_args,
        ["--resume", str(sharded / "checkpoints" / "epoch_1.pt")],
    )
    from_full = run(
        workdir,
        "resume-full",
        loss_args,
        ["--resume", str(replicated / "checkpoints" / "epoch_1.pt")],
    )
    ours = checkpoint(from_shards / "checkpoints" / "epoch_2.pt")
    theirs = checkpoint(from_full / "checkpoints" / "epoch_2.pt")
    assert_same(ours["loss_state_dict"], theirs["loss_state_dict"], "resumed loss state")
    assert_same(ours["state_dict"], theirs["state_dict"], "model")
    assert "restored the tempnet loss state" in (from_shards / "out.log").read_text()


# ---------------------------------------------------------------------------- bad input
def cli_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, argv: list) -> str:
    monkeypatch.setattr(sys, "argv", ["openclip_tau.train", *argv])
    with pytest.raises(SystemExit) as exit_info:
        train.cli()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith("openclip_tau.train: error: "), err[-2000:]
    return last


def test_setup_errors_of_the_new_options(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    base = common_args(workdir, "setup-errors", 1, 64)
    err = cli_error(monkeypatch, capsys, ["--loss", "clip", "--tau-state", "sharded"] + base)
    assert "--tau-state applies to sogclr, isogclr, rgclg, tempnet" in err
    err = cli_error(monkeypatch, capsys, LOSS_ARGS["rgclg"] + ["--tau-state", "sharded"] + base)
    assert "this run has one process: use --tau-state replicated" in err
    err = cli_error(monkeypatch, capsys, LOSS_ARGS["tempnet"] + base + ["--accum-freq", "2"])
    assert "--accum-freq 2" in err and "counted 2 times" in err
    err = cli_error(monkeypatch, capsys, LOSS_ARGS["rgclg"] + base + ["--opt", "timm/adamw"])
    assert "--opt timm/adamw is not supported" in err


def test_lr_drop_below_none_switches_the_drop_off() -> None:
    options, _ = train.parse_loss_args(["--loss", "rgclg", "--tau-lr-drop-below", "none"])
    assert train.loss_kwargs(options) == {"lr_tau_drop_below": None}
    loss = train.build_loss("rgclg", train.loss_kwargs(options), num_samples=4)
    assert loss.lr_tau_drop_below is None
    options, _ = train.parse_loss_args(["--loss", "rgclg", "--tau-lr-drop-below", "0.05"])
    assert train.loss_kwargs(options) == {"lr_tau_drop_below": 0.05}
    assert train.with_flag_names("lr_tau_drop_below and lr_tau") == (
        "--tau-lr-drop-below and --tau-lr"
    )


def test_saved_optimizer_state_loads_before_and_after_the_temperature_group() -> None:
    """What a resume does: upstream loads the state without the temperature group into the
    model's optimizer; once the loss's group is added, the whole state loads."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    loss = train.build_loss("tempnet", {"num_prototypes": 4}, num_samples=10, dim=3)

    def optimizer() -> torch.optim.AdamW:
        return torch.optim.AdamW(
            [{"params": [model.bias], "weight_decay": 0.0}, {"params": [model.weight]}], lr=0.1
        )

    first = optimizer()
    for group in loss.param_groups():
        first.add_param_group(group)
    loss.register_optimizer(first)
    features = torch.nn.functional.normalize(model(torch.randn(6, 4)), dim=1)
    loss(features, features.roll(1, 0), None, index=torch.arange(6)).backward()
    first.step()
    saved = first.state_dict()
    assert train.temperature_groups(saved) == [2]

    second = optimizer()
    with pytest.raises(ValueError):
        second.load_state_dict(saved)  # what upstream would do with the whole state
    second.load_state_dict(train.without_temperature_groups(saved))
    assert len(second.state) == 2
    for group in loss.param_groups():
        second.add_param_group(group)
    second.load_state_dict(saved)
    for p, q in zip(
        [p for g in first.param_groups for p in g["params"]],
        [p for g in second.param_groups for p in g["params"]],
    ):
        assert p is q
        for k, v in first.state[p].items():
            assert torch.equal(second.state[q][k], v), k


def test_shard_folders_that_no_checkpoint_names_are_removed(tmp_path: Path) -> None:
    """Folder K stays while epoch_K.pt exists (or K is the newest, named by epoch_latest.pt)."""
    options, _ = train.parse_loss_args(["--loss", "isogclr"])
    run_ = train.LossTraining(options)
    folders = {}
    for epoch in (1, 2, 3):
        folders[epoch] = tmp_path / train.shard_folder_name(epoch)
        folders[epoch].mkdir()
        (folders[epoch] / "index.json").write_text("{}")
    (tmp_path / "epoch_2.pt").write_bytes(b"")  # epoch 1's was deleted, 3 is only "latest"
    run_.shard_folders = {k: str(v) for k, v in folders.items()}
    run_.last_completed = 3
    args = argparse.Namespace(checkpoint_path=str(tmp_path), rank=0, local_rank=0)
    run_.remove_unreferenced_shards(args)
    assert not folders[1].exists() and folders[2].exists() and folders[3].exists()
    assert run_.shard_folders == {3: str(folders[3])}
    run_.shard_folders = {2: str(folders[2])}
    run_.remove_unreferenced_shards(argparse.Namespace(checkpoint_path="", rank=1, local_rank=1))
    assert folders[2].exists()  # only the master removes
