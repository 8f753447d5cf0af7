"""``openclip_tau.train``: exact resume with resampled shards and data workers, option checks,
distributed flags, the calibrated ``logit_scale``, upstream-drift guards and table statistics.

The end-to-end runs use the tiny model on CPU in this process (fp32, one thread, full-image
crop), as ``test_openclip_train.py`` does, on a smaller set of img2dataset-style shards.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from open_clip_train import data as upstream_data
from open_clip_train import main as upstream_main
from open_clip_train import params as upstream_params
from open_clip_train import train as upstream_train
from openclip_fixtures import (
    NO_CROP_AUGMENTATION,
    TINY_MODEL,
    free_port,
    register_tiny_model,
    shard_pattern,
    write_csv,
    write_shards,
)

from openclip_tau import data as tau_data
from openclip_tau import key_index, train
from openclip_tau.key_index import build_key_index, expand_shards

torch.set_num_threads(1)

NUM_SAMPLES = 256
PER_SHARD = 64
NUM_SHARDS = NUM_SAMPLES // PER_SHARD
BATCH = 32
TABLE = NUM_SHARDS * 10**4  # integer img2dataset keys: shard * 10**4 + position
ISOGCLR = ["--loss", "isogclr", "--tau-num-samples", str(TABLE), "--tau-rho", "0.5"]
ISOGCLR += ["--tau-init", "0.05"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("openclip_checks")
    register_tiny_model(root)
    write_shards(root / "shards", NUM_SAMPLES, PER_SHARD)
    assert key_index.main(["--shards", shards(root), "--output", str(root / "key_index.txt")]) == 0
    return root


def shards(root: Path) -> str:
    return shard_pattern(root / "shards", NUM_SHARDS)


def common_args(root: Path, name: str, epochs: int = 2, samples: int = 128) -> list[str]:
    return [
        *("--model", TINY_MODEL, "--train-data", shards(root), "--dataset-type", "webdataset"),
        *("--train-num-samples", str(samples), "--batch-size", str(BATCH)),
        *("--epochs", str(epochs), "--lr", "5e-4", "--warmup", "1", "--lr-scheduler", "const"),
        *("--workers", "0", "--device", "cpu", "--precision", "fp32", "--seed", "0"),
        *("--log-every-n-steps", "1", "--logs", str(root / "logs"), "--name", name),
        *NO_CROP_AUGMENTATION,
    ]


def run(root: Path, name: str, loss_args: list[str], extra: list[str] = (), **kw) -> Path:
    shutil.rmtree(root / "logs" / name, ignore_errors=True)
    assert train.main(loss_args + common_args(root, name, **kw) + list(extra)) is None
    return root / "logs" / name


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def visited_median(state: dict) -> torch.Tensor:
    """Reference: median of the visited image and text temperatures pooled (linear interp.)."""
    pooled = [
        state[f"state.tau_{role}"][torch.isfinite(state[f"state.log_u_{role}"])]
        for role in ("image", "text")
    ]
    return torch.quantile(torch.cat(pooled).double(), 0.5).float()


# ---------------------------------------------------------------------------- item 1 (and 2, 5, 8)
class Killed(Exception):
    pass


@pytest.mark.slow
def test_resampled_shards_with_workers_resume_exactly(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--dataset-resampled --workers 2, killed mid-epoch and resumed with --resume latest, ends
    with the same state and weights as the uninterrupted run. The same runs check the log line
    for --local-loss --gather-with-grad, the calibrated logit_scale, the table statistics, and
    that the restore is logged once."""
    extra = ["--dataset-resampled", "--workers", "2", "--save-most-recent"]
    extra += ["--local-loss", "--gather-with-grad"]
    straight = run(workdir, "resampled-straight", ISOGCLR, extra)

    name = "resampled-killed"
    real_end_step = train.LossTraining.end_step

    def dies_mid_second_epoch(self, stats):
        if self.epoch == 1 and self.step_in_epoch == 1:  # one step of epoch 1 done
            raise Killed()
        return real_end_step(self, stats)

    monkeypatch.setattr(train.LossTraining, "end_step", dies_mid_second_epoch)
    shutil.rmtree(workdir / "logs" / name, ignore_errors=True)
    with pytest.raises(Killed):
        train.main(ISOGCLR + common_args(workdir, name) + extra)
    monkeypatch.setattr(train.LossTraining, "end_step", real_end_step)
    killed_dir = workdir / "logs" / name
    assert sorted(os.listdir(killed_dir / "checkpoints")) == ["epoch_1.pt", "epoch_latest.pt"]
    assert train.main(ISOGCLR + common_args(workdir, name) + extra + ["--resume", "latest"]) is None

    ours = checkpoint(killed_dir / "checkpoints" / "epoch_2.pt")
    theirs = checkpoint(straight / "checkpoints" / "epoch_2.pt")
    for key, value in theirs["loss_state_dict"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(ours["loss_state_dict"][key], value), key
    for key, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][key], value), key

    # Item 5: logit_scale is ln(1 / median of the visited temperatures) of the saved tables.
    state = theirs["loss_state_dict"]
    expected = torch.log(1.0 / visited_median(state))
    torch.testing.assert_close(theirs["state_dict"]["logit_scale"], expected, rtol=0, atol=1e-6)
    assert theirs["loss_options"]["logit_scale"].startswith("1/median")
    first = checkpoint(straight / "checkpoints" / "epoch_1.pt")
    assert not torch.equal(first["state_dict"]["logit_scale"], theirs["state_dict"]["logit_scale"])

    log = (straight / "out.log").read_text()
    resumed_log = (killed_dir / "out.log").read_text()
    # Item 2: the distributed flags are honoured and said so, once.
    assert log.count("as upstream's --local-loss --gather-with-grad") == 1
    assert "--local-loss --gather-with-grad given" in log
    # Item 8: whole-table statistics at the end of every epoch, named as such.
    assert log.count("Table stats epoch") == 2
    for name_ in ("table_tau_image_mean", "table_tau_text_p50", "table_visited_image"):
        assert name_ in log
    # The console's scale is the calibrated one (upstream prints exp(logit_scale)).
    shown = float(log.rsplit("Logit Scale: ", 1)[1].split()[0])
    assert shown == pytest.approx(1.0 / visited_median(first["loss_state_dict"]).item(), rel=2e-3)
    # "restored" once (the run logs it on the master rank only).
    assert resumed_log.count("restored the isogclr loss state") == 1


def test_resampled_shard_draw_depends_on_seed_and_epoch_only() -> None:
    urls = "shard-{00..49}.tar"

    def draw(seed: int, epochs: list[int], torch_seed: int) -> list[str]:
        torch.manual_seed(torch_seed)  # upstream's draw followed the worker seed (torch RNG)
        random.seed(torch_seed)
        epoch = upstream_data.SharedEpoch(0)
        shards = tau_data.EpochSeededResampledShards(urls, seed=seed, epoch=epoch, nshards=8)
        out = []
        for e in epochs:
            epoch.set_value(e)
            out = [s["url"] for s in shards]
        return out

    once = draw(0, [3], torch_seed=1)
    after_others = draw(0, [0, 1, 2, 3], torch_seed=2)
    assert once == after_others and len(once) == 8
    assert draw(0, [2], 1) != once
    assert draw(1, [3], 1) != once


# ---------------------------------------------------------------------------- item 3


def test_csv_order_under_torchrun_follows_the_seed(workdir: Path) -> None:
    csv_path = write_csv(workdir / "csv-seed", 64)

    def sampler_order(seed: int, epoch: int) -> list[int]:
        args = upstream_params.parse_args(
            ["--train-data", str(csv_path), "--dataset-type", "csv", "--seed", str(seed)]
            + ["--batch-size", "8", "--workers", "0"]
        )
        args.distributed, args.world_size, args.rank = True, 1, 0
        info = tau_data.indexed_train_data(args, lambda image: image, 0, lambda text: [text])
        assert isinstance(info.sampler, tau_data.EpochSeededDistributedSampler)
        assert info.sampler.seed == seed
        info.set_epoch(epoch)
        return list(iter(info.sampler))

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        assert sampler_order(0, 0) == sampler_order(0, 0)
        assert sampler_order(0, 0) != sampler_order(1, 0)  # upstream: always seed 0
        assert sampler_order(1, 0) != sampler_order(1, 1)
        assert sampler_order(1, 0) != sampler_order(0, 1)  # upstream: seed + epoch, equal
        # Item 7: the rank check works on the tables' own device, here with a 1-rank group.
        loss = train.ISogCLRClipLoss(num_samples=10)
        run_ = train.LossTraining(argparse.Namespace(loss="isogclr", **_no_options()))
        run_.loss = loss
        run_.check_ranks_agree(argparse.Namespace(world_size=1, rank=0, local_rank=0))
    finally:
        torch.distributed.destroy_process_group()


def _no_options() -> dict:
    options = {dest: None for dest in train.LOSS_OPTIONS}
    options.update(tau_num_samples=None, tau_key_index=None, tau_fresh_state=False)
    options.update(add_model_config=[])
    return options


# ---------------------------------------------------------------------------- item 4
@pytest.mark.parametrize(
    "loss_args, message",
    [
        (["--loss", "isogclr", "--tau-rho", "-1"], "--tau-rho must lie in [0, inf], got -1.0."),
        (
            ["--loss", "isogclr", "--tau-min", "0.5", "--tau-max", "0.1"],
            "--tau-min (0.5) must not exceed --tau-max (0.1).",
        ),
        (["--loss", "sogclr", "--tau-gamma", "0"], "--tau-gamma must lie in (0, 1], got 0.0."),
        (["--loss", "dystress", "--tau-min", "0"], "--tau-min must lie in (0, inf], got 0.0."),
        (["--loss", "isogclr", "--tau-init", "2"], "--tau-init must lie in"),
        # RGCL-g and TempNet
        (["--loss", "rgclg", "--tau-lr", "-1"], "--tau-lr must lie in [0, inf], got -1.0."),
        (["--loss", "rgclg", "--tau-init", "2"], "--tau-init must lie in [0.01, 1], got 2.0."),
        (
            ["--loss", "rgclg", "--tau-lr-drop-factor", "2"],
            "--tau-lr-drop-factor must lie in (0, 1], got 2.0.",
        ),
        (["--loss", "rgclg", "--tau-eta", "0.1"], "--tau-eta applies to --loss isogclr"),
        (["--loss", "tempnet", "--tau-lr-decay", "0"], "--tau-lr-decay must lie in (0, 1]"),
        (["--loss", "tempnet", "--tau-dropout", "1.5"], "--tau-dropout"),
        (["--loss", "tempnet", "--tau-prototypes", "0"], "--tau-prototypes"),
        (["--loss", "tempnet", "--tau-lr-drop-below", "0.1"], "--tau-lr-drop-below applies to"),
        (["--loss", "sogclr", "--tau-prototypes", "8"], "--tau-prototypes applies to"),
    ],
)
def test_loss_options_are_checked_before_anything_is_built(
    workdir: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    loss_args: list[str],
    message: str,
) -> None:
    def never(*args, **kwargs):
        raise AssertionError("open_clip_train.main ran")

    monkeypatch.setattr(upstream_main, "main", never)
    with pytest.raises(SystemExit) as exit_info:
        train.main(loss_args + common_args(workdir, "bad-option"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_flag_names_replace_keywords_in_messages() -> None:
    assert train.with_flag_names("tau_min (1) must not exceed tau_max (0.5); rho, eta") == (
        "--tau-min (1) must not exceed --tau-max (0.5); --tau-rho, --tau-eta"
    )
    assert train.with_flag_names("beta and gamma_decay_epochs") == (
        "--tau-beta and --tau-gamma-decay-epochs"
    )


def cli_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, argv: list) -> str:
    monkeypatch.setattr(sys, "argv", ["openclip_tau.train", *argv])
    with pytest.raises(SystemExit) as exit_info:
        train.cli()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # upstream's log lines, then ours
    assert "Traceback" not in err, err
    last = err.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith("openclip_tau.train: error: "), err[-2000:]
    return last


def test_key_beyond_the_table_is_one_line_with_key_and_shard(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    argv = ["--loss", "sogclr", "--tau-num-samples", "100"] + common_args(workdir, "key", 1, 64)
    err = cli_error(monkeypatch, capsys, argv)
    assert "Sample key '0000" in err and "(shard " in err and ".tar)" in err
    assert "outside the per-sample table [0, 100)" in err


# ---------------------------------------------------------------------------- item 2
def test_distributed_flags_that_mean_something_else_are_refused(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    base = ["--loss", "dystress"] + common_args(workdir, "dist-flags", 1, 64)
    err = cli_error(monkeypatch, capsys, base + ["--local-loss"])
    assert "--local-loss without --gather-with-grad" in err and "both flags or neither" in err
    err = cli_error(monkeypatch, capsys, base + ["--loss-dist-impl", "bidir"])
    assert "--loss-dist-impl bidir" in err and "leave --loss-dist-impl out" in err
    # Upstream's own loss keeps upstream's meaning of the flags.
    options, _ = train.parse_loss_args(["--loss", "clip", "--local-loss"])
    args = upstream_params.parse_args(["--local-loss", "--model", TINY_MODEL])
    train.LossTraining(options)._check(args)


# ---------------------------------------------------------------------------- items 5, 6, 7, 9
def test_sogclr_logit_scale_is_one_over_its_temperature(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also: the loss lives on the training device (item 7); the small-batch warning (item 9)
    is not given for SogCLR."""
    devices = []
    real_create_loss = train.LossTraining.create_loss

    def spy(self, args):
        result = real_create_loss(self, args)
        devices.append((self.loss.state.device, torch.device(args.device)))
        return result

    monkeypatch.setattr(train.LossTraining, "create_loss", spy)
    loss_args = ["--loss", "sogclr", "--tau-temperature", "0.04", "--tau-key-index"]
    loss_args.append(str(workdir / "key_index.txt"))
    out = run(workdir, "sogclr-scale", loss_args, epochs=1, samples=64)
    saved = checkpoint(out / "checkpoints" / "epoch_1.pt")
    scale = saved["state_dict"]["logit_scale"]
    assert scale.item() == torch.log(1.0 / torch.tensor(0.04)).item()
    log = (out / "out.log").read_text()
    # Every step's console line shows 1/0.04, the first one included.
    shown = [float(x.split()[0]) for x in log.split("Logit Scale: ")[1:]]
    assert shown and all(v == pytest.approx(25.0, abs=1e-3) for v in shown)
    assert devices == [(devices[0][1], devices[0][1])]
    assert "is not below log(B - 1)" not in log
    assert saved["loss_options"]["index"].startswith("key index sha256:")


def test_guards_against_upstream_drift(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A loop that draws the batches but never calls the loss.
    def loop_without_loss(model, data, loss, epoch, *args, **kwargs):
        data["train"].set_epoch(epoch)
        for _ in data["train"].dataloader:
            pass

    monkeypatch.setattr(upstream_train, "train_one_epoch", loop_without_loss)
    with pytest.raises(train.UpstreamDriftError, match="drew 2 batches but called"):
        run(
            workdir,
            "no-loss-call",
            ["--loss", "isogclr", "--tau-num-samples", str(TABLE)],
            epochs=1,
            samples=64,
        )
    log = (workdir / "logs" / "no-loss-call" / "out.log").read_text()
    # Item 9: the published rho 6 with a global batch of 32 is warned about.
    assert "--tau-rho 6 is not below log(B - 1) = 3.43" in log
    monkeypatch.undo()

    # A checkpoint written without going through our save.
    def plain_save(self, obj, f, *args, **kwargs):
        return torch.save(obj, f, *args, **kwargs)

    monkeypatch.setattr(train.LossTraining, "save", plain_save)
    with pytest.raises(train.UpstreamDriftError, match="epoch_1.pt without openclip_tau's loss"):
        run(workdir, "plain-save", ["--loss", "dystress"], epochs=1, samples=64)


def test_stateful_resume_needs_matching_state_or_a_fresh_start_flag(
    workdir: Path, tmp_path: Path
) -> None:
    index = str(workdir / "key_index.txt")
    sog = ["--loss", "sogclr", "--tau-key-index", index]
    first = run(workdir, "sog-1", sog, epochs=1, samples=64)
    path = first / "checkpoints" / "epoch_1.pt"

    # The same shards indexed in another order: another map, refused.
    reordered = tmp_path / "reordered.txt"
    build_key_index(list(reversed(expand_shards(shards(workdir)))), reordered)
    other = ["--loss", "sogclr", "--tau-key-index", str(reordered)]
    with pytest.raises(train.TrainingSetupError, match="another sample-to-row map"):
        run(workdir, "sog-reordered", other, ["--resume", str(path)], samples=64)

    # No loss state in the checkpoint (as open_clip_train writes it): refused.
    bare = checkpoint(path)
    for key in train.CHECKPOINT_KEYS:
        bare.pop(key)
    bare_path = tmp_path / "bare.pt"
    torch.save(bare, bare_path)
    with pytest.raises(train.TrainingSetupError, match="holds no loss state.*--tau-fresh-state"):
        run(workdir, "sog-bare", sog, ["--resume", str(bare_path)], samples=64)

    # With --tau-fresh-state the run resumes the model and starts the state fresh.
    out = run(
        workdir, "sog-fresh", other + ["--tau-fresh-state"], ["--resume", str(path)], samples=64
    )
    log = (out / "out.log").read_text()
    assert "--tau-fresh-state: the sogclr loss state" in log
    assert "=> resuming checkpoint" in log
    state = checkpoint(out / "checkpoints" / "epoch_2.pt")["loss_state_dict"]
    saved = checkpoint(path)["loss_state_dict"]
    assert torch.isfinite(state["state.log_u_image"]).sum() == 64  # epoch 2's batches only
    assert not torch.equal(state["state.log_u_image"], saved["state.log_u_image"])


def test_table_statistics_are_quantiles_of_the_visited_rows() -> None:
    values = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    stats = train.quantile_stats(values, "t")
    reference = torch.quantile(values.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    for q, ref in zip((10, 50, 90), reference):
        assert stats[f"t_p{q}"].item() == pytest.approx(ref.item(), abs=1e-6)
    assert stats["t_mean"].item() == pytest.approx(values.mean().item())
    assert stats["t_min"] == values.min() and stats["t_max"] == values.max()

    loss = train.ISogCLRClipLoss(num_samples=50, tau_init=0.05, rho=0.5)
    features = torch.nn.functional.normalize(torch.randn(8, 16), dim=1).requires_grad_()
    loss(features, features.roll(1, 1), None, index=torch.arange(8) * 3).backward()  # a step
    run_ = train.LossTraining(argparse.Namespace(loss="isogclr", **_no_options()))
    run_.loss = loss
    table = run_.table_stats()
    assert table["table_visited_image"] == 8 and table["table_visited_text"] == 8
    tau_image = loss.tau_image[torch.arange(8) * 3]
    assert table["table_tau_image_mean"].item() == pytest.approx(tau_image.mean().item())
    pooled = torch.cat([tau_image, loss.tau_text[torch.arange(8) * 3]])
    assert run_.table_median.item() == pytest.approx(torch.quantile(pooled, 0.5).item())
    assert math.isclose(run_.spec.temperature(run_).item(), run_.table_median.item())
