"""The CC3M recipe: its smoke mode end to end on CPU, its artifacts, and its bad-input messages."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recipes.cc3m import (
    analyze,
    evaluate,
    make_smoke_data,
    openclip_zero_shot,
    shards,
    smoke,
    temperature_tables,
    tsv,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "recipes" / "cc3m"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One smoke run (data, key index, iSogCLR training, evaluation, analysis) for the module."""
    output = tmp_path_factory.mktemp("cc3m_smoke")
    summary = smoke.run_smoke(output, losses=("isogclr",))
    return {"output": output, **summary}


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# ----------------------------------------------------------------------------- step 1: data
@pytest.mark.slow
def test_smoke_shards_have_img2dataset_layout(smoke_run: dict) -> None:
    shard_dir = Path(smoke_run["data"]["shards"])
    files = shards.find_shards(shard_dir)
    assert [f.name for f in files] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    all_keys, gaps = [], 0
    for shard_id, shard in enumerate(files):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            keys = sorted({n.split(".")[0] for n in names})
            assert sorted(names) == sorted(
                f"{k}.{ext}" for k in keys for ext in ("jpg", "json", "txt")
            )
            first = keys[0]
            meta = json.loads(tar.extractfile(f"{first}.json").read())
            caption = tar.extractfile(f"{first}.txt").read().decode()
            image = tar.extractfile(f"{first}.jpg").read()
        # img2dataset's keys: 5-digit shard number, then the 4-digit position in the shard.
        assert all(len(k) == 9 and k.startswith(f"{shard_id:05d}") for k in keys)
        assert meta["key"] == first and meta["caption"] == caption and meta["status"] == "success"
        assert image[:2] == b"\xff\xd8"  # JPEG
        assert any(name in caption for name in make_smoke_data.CLASS_NAMES)
        table = pd.read_parquet(shard.with_suffix(".parquet"))
        stats = json.loads(shard.with_name(f"{shard.stem}_stats.json").read_text())
        ok = table[table["status"] == "success"]
        assert sorted(ok["key"]) == keys
        assert stats["successes"] == len(keys) and stats["count"] == len(table)
        all_keys += keys
        gaps += int(keys[-1][5:]) + 1 - len(keys)
    # Failed downloads leave gaps: the keys are sparse.
    assert len(all_keys) == smoke_run["data"]["successes"] < smoke_run["data"]["count"]
    assert gaps > 0
    captions = shards.read_captions(files)
    assert sorted(captions["key"]) == sorted(all_keys)


def test_captions_are_read_from_tars_without_parquet(tmp_path: Path, smoke_run: dict) -> None:
    source = shards.find_shards(smoke_run["data"]["shards"])[1]
    (tmp_path / source.name).write_bytes(source.read_bytes())  # the tar alone
    from_tar = shards.read_captions([tmp_path / source.name])
    from_parquet = shards.read_captions([source])
    assert from_tar.sort_values("key").to_dict("list") == from_parquet.sort_values("key").to_dict(
        "list"
    )


def test_smoke_key_index_covers_every_sample(smoke_run: dict) -> None:
    from openclip_tau.key_index import load_key_index

    index = load_key_index(smoke_run["key_index"])
    captions = shards.read_captions(shards.find_shards(smoke_run["data"]["shards"]))
    assert len(index) == smoke_run["data"]["successes"]
    assert sorted(index.keys) == sorted(captions["key"])


# ----------------------------------------------------------------------------- step 2: train
def test_smoke_checkpoint_holds_the_learned_temperatures(smoke_run: dict) -> None:
    checkpoint = torch.load(smoke_run["checkpoints"]["isogclr"], weights_only=False)
    assert checkpoint["loss_name"] == "isogclr" and checkpoint["epoch"] == 2
    state = checkpoint["loss_state_dict"]
    n = smoke_run["data"]["successes"]
    for role in ("image", "text"):
        tau = state[f"state.tau_{role}"]
        assert tau.shape == (n,)
        assert torch.isfinite(state[f"state.log_u_{role}"]).all()  # 2 epochs visit every pair
        assert ((tau >= 0.005) & (tau <= 1.0)).all()
        assert tau.std() > 1e-3 and not torch.allclose(tau, torch.full_like(tau, 0.05))


@pytest.mark.slow
def test_smoke_training_resumes_from_its_last_checkpoint(smoke_run: dict) -> None:
    """Running train.sh's command again with more epochs continues the run (--resume latest)."""
    from openclip_tau import train as train_cli

    shard_dir, logs = Path(smoke_run["data"]["shards"]), smoke_run["output"] / "logs"
    before = torch.load(smoke_run["checkpoints"]["isogclr"], weights_only=False)
    args = smoke.train_command("isogclr", shard_dir, logs, ["--report-to", "", "--epochs", "3"])
    train_cli.main(args)
    run_dir = logs / "smoke-isogclr"
    after = torch.load(run_dir / "checkpoints" / "epoch_3.pt", weights_only=False)
    assert after["epoch"] == 3 and after["loss_name"] == "isogclr"
    log = (run_dir / "out.log").read_text()
    resumed = log[log.index("resuming checkpoint") :]  # the second run's part of the log
    assert "epoch_2.pt' (epoch 2)" in resumed.splitlines()[0]
    assert "restored the isogclr loss state" in resumed
    assert (
        "Start epoch 2" in resumed
        and "Start epoch 0" not in resumed
        and "Start epoch 1" not in resumed
    )
    # The third epoch moved the restored state on.
    for role in ("image", "text"):
        key = f"state.tau_{role}"
        assert not torch.equal(before["loss_state_dict"][key], after["loss_state_dict"][key])


def test_train_script_builds_the_published_settings(smoke_run: dict) -> None:
    data = smoke_run["data"]["shards"]
    env = dict(_env(), DATA=data, DRY_RUN="1", NPROC="4", NNODES="1")
    out = subprocess.run(
        ["bash", str(SCRIPTS / "train.sh"), "isogclr", "--tau-rho", "8.0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node" in out

    def value(flag: str) -> str:
        return out[len(out) - 1 - out[::-1].index(flag) + 1]  # last occurrence wins, as argparse

    assert value("--batch-size") == "128"  # global batch 512 over 4 processes
    assert (value("--lr"), value("--wd"), value("--epochs")) == ("2e-4", "0.02", "30")
    assert (value("--tau-init"), value("--tau-min"), value("--tau-max")) == ("0.01", "0.005", "1.0")
    assert (value("--tau-eta"), value("--tau-beta"), value("--tau-gamma")) == ("0.03", "0.9", "0.8")
    assert value("--tau-rho") == "8.0"  # appended options win over the recipe's 6.0
    assert value("--resume") == "latest" and value("--model") == "RN50-distilbert-size"
    assert value("--train-num-samples") == str(smoke_run["data"]["successes"])


def test_slurm_script_starts_torchrun_per_node(tmp_path: Path, smoke_run: dict) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(
        '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=1 exec "$@"\n'
    )
    (fake / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'node-a\\nnode-b\\n'\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    env = dict(
        _env(),
        PATH=f"{fake}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_NNODES="2",
        SLURM_GPUS_PER_NODE="4",
        DATA=smoke_run["data"]["shards"],
        LOSS="sogclr",
        DRY_RUN="1",
    )
    out = subprocess.run(
        ["bash", str(SCRIPTS / "slurm.sbatch")], env=env, capture_output=True, text=True, check=True
    ).stdout
    for part in ("--nnodes 2", "--node_rank 1", "--nproc_per_node 4", "--master_addr node-a"):
        assert part in out
    assert "--batch-size 64 " in out and "--tau-temperature 0.01 --tau-gamma 0.9" in out


# ----------------------------------------------------------------------------- step 3: evaluate
def test_smoke_evaluation_table(smoke_run: dict) -> None:
    output = smoke_run["output"] / "eval"
    run = json.loads((output / "runs" / "smoke-isogclr.json").read_text())
    assert run["loss"] == "isogclr" and run["model"] == "cc3m-smoke-tiny"
    for direction in ("i2t", "t2i"):
        recalls = [run[f"local_{direction}_r{k}"] for k in (1, 5, 10)]
        assert all(0.0 <= r <= 100.0 for r in recalls) and recalls == sorted(recalls)
    table = pd.read_csv(output / "comparison.csv", dtype=str)
    ours = table[table["source"] == "ours"]
    assert list(ours["run"]) == ["smoke-isogclr"]
    assert float(ours["local_i2t_r1"].iloc[0]) == pytest.approx(run["local_i2t_r1"], abs=0.01)
    assert (ours["imagenet_top1"] == "not run").all()
    published = table[table["source"].str.startswith("published (")]
    assert set(published["method"]) >= {"iSogCLR", "SogCLR", "FastCLIP-v2", "OpenCLIP"}
    assert (published["mscoco_i2t_r1"] == "see paper").all()  # never an invented number
    markdown = (output / "comparison.md").read_text()
    assert "*published [1]*" in markdown and "arXiv:2407.01445" in markdown


def test_comparison_table_shows_published_numbers_as_theirs(tmp_path: Path) -> None:
    """docs/published.md's TempNet figure (CC3M, mean of 3 seeds) in our columns, marked as theirs
    with its setting; FastCLIP's metrics that we do not compute below the table."""
    table = evaluate.build_table(tmp_path).set_index("method", drop=False)
    theirs = table[table["source"].str.startswith("published numbers (")]
    assert list(theirs["method"]) == ["CLIP", "CyCLIP", "SogCLR", "iSogCLR", "TempNet"]
    tempnet = theirs.loc["TempNet"]
    assert tempnet["imagenet_top1"] == "42.28" and tempnet["mscoco_i2t_r1"] == "34.50"
    assert tempnet["mscoco_t2i_r1"] == "24.83" and tempnet["flickr30k_i2t_r1"] == "62.51"
    assert tempnet["flickr30k_t2i_r1"] == "46.17" and tempnet["mscoco_i2t_r5"] == "n/a"
    assert "zhqiu/TempNet" in tempnet["source"] and "DistilBERT" in tempnet["model"]
    markdown = (tmp_path / "comparison.md").read_text()
    assert "*published, theirs [3]*" in markdown
    assert "| FastCLIP-v1 (SogCLR + cosine gamma) | 24.87 (0.13) | 29.28 (0.30) |" in markdown
    assert "| TempNet | 61.77 | 34.69 |" in markdown
    assert "read off the README's plot" in markdown


def test_recall_at_k_counts_a_query_once_with_any_positive() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.3, 0.7], [0.5, 0.4, 0.6]])
    positive = torch.tensor([[False, True, True], [True, False, False], [False, False, True]])
    # Query 0: best positive ranked 2nd; query 1: 3rd; query 2: 1st.
    assert evaluate.recall_at_k(scores, positive, (1, 2, 3)) == pytest.approx(
        {1: 100 / 3, 2: 200 / 3, 3: 100.0}
    )


# ----------------------------------------------------------------------------- step 4: analyse
def test_smoke_analysis_writes_plots_and_tables(smoke_run: dict) -> None:
    output = Path(smoke_run["analysis"])
    for name in ("tau_distribution.png", "tau_vs_word_frequency.png", "tau_image_vs_text.png"):
        data = (output / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    frame = pd.read_parquet(output / "temperatures.parquet")
    assert len(frame) == smoke_run["data"]["successes"] and (frame["caption"] != "").all()
    extremes = pd.read_csv(output / "extremes.csv")
    highest = extremes[(extremes["temperature"] == "tau_image") & (extremes["end"] == "highest")]
    assert highest["tau"].iloc[0] == pytest.approx(frame["tau_image"].max())
    summary = json.loads((output / "summary.json").read_text())
    assert summary["loss"] == "isogclr" and len(summary["correlations"]) == 6
    assert (output / "summary.md").read_text().startswith("# Learned temperatures")


def test_analysis_correlations_on_a_constructed_state(tmp_path: Path, smoke_run: dict) -> None:
    """Temperatures set to a known function of word frequency give Spearman +1 and -1."""
    from openclip_tau import ISogCLRClipLoss
    from openclip_tau.key_index import load_key_index

    index = load_key_index(smoke_run["key_index"])
    captions = shards.read_captions(shards.find_shards(smoke_run["data"]["shards"]))
    by_key = dict(zip(captions["key"], captions["caption"]))
    frequency = temperature_tables.word_frequency_table(list(captions["caption"]))
    frequency.index = captions["key"]
    rarest = torch.tensor([float(frequency.loc[k, "rarest_word_frequency"]) for k in index.keys])
    loss = ISogCLRClipLoss(len(index))
    state = loss.state_dict()
    state["state.tau_image"] = 0.005 + rarest / rarest.max()  # rises with frequency
    state["state.tau_text"] = 1.0 / rarest  # falls with frequency
    visited = torch.arange(len(index)) % 4 != 0  # a quarter never visited: left out
    for role in ("image", "text"):
        state[f"state.log_u_{role}"] = torch.where(visited, 0.0, -math.inf)
    loss.load_state_dict(state)
    checkpoint = tmp_path / "epoch_1.pt"
    torch.save(
        {"epoch": 1, "loss_name": "isogclr", "loss_state_dict": loss.state_dict()}, checkpoint
    )
    summary = analyze.analyze(checkpoint, Path(smoke_run["key_index"]), tmp_path / "out", top=3)
    rho = {(c["temperature"], c["against"]): c for c in summary["correlations"]}
    assert rho[("tau_image", "rarest_word_frequency")]["spearman"] == pytest.approx(1.0)
    assert rho[("tau_text", "rarest_word_frequency")]["spearman"] == pytest.approx(-1.0)
    assert rho[("tau_image", "rarest_word_frequency")]["n"] == int(visited.sum())
    assert summary["visited_image"] == int(visited.sum())
    extremes = pd.read_csv(tmp_path / "out" / "extremes.csv", dtype={"key": str})
    lowest = extremes.query("temperature == 'tau_image' and end == 'lowest'")
    highest = extremes.query("temperature == 'tau_image' and end == 'highest'")
    assert (lowest["rarest_word_frequency"] == rarest[visited].min().item()).all()
    assert (highest["rarest_word_frequency"] == rarest[visited].max().item()).all()
    assert by_key[str(highest["key"].iloc[0])] == highest["caption"].iloc[0]


def test_tempnet_held_out_temperatures_beside_the_training_ones(tmp_path: Path) -> None:
    """A TempNet loss state: the analysis rebuilds its networks and gives held-out embeddings
    the temperatures the loss itself gives them, and plots them beside the training pairs'."""
    from openclip_tau import TempNetClipLoss

    loss = TempNetClipLoss(10, dim=6, num_prototypes=8, lr_tau=0.05)
    optimizer = torch.optim.Adam(loss.param_groups(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        image = torch.randn(5, 6, generator=g, requires_grad=True)
        text = torch.randn(5, 6, generator=g)
        loss(image, text, None, index=torch.randperm(10, generator=g)[:5]).backward()
        optimizer.step()
        optimizer.zero_grad()
    checkpoint = tmp_path / "epoch_1.pt"
    torch.save({"loss_state_dict": loss.state_dict(), "loss_name": "tempnet"}, checkpoint)
    held_out = {"image": torch.randn(7, 6, generator=g), "text": torch.randn(4, 6, generator=g)}
    torch.save(held_out, tmp_path / "held_out.pt")
    got = temperature_tables.held_out_temperatures(checkpoint, tmp_path / "held_out.pt")
    for role in ("image", "text"):
        want = loss.temperature_of(held_out[role], role=role).numpy()
        np.testing.assert_allclose(got[role], want, rtol=1e-6)
    tables, _ = temperature_tables.load_temperature_tables(checkpoint)
    visited = np.isfinite(tables["log_u_image"])
    assert np.isfinite(tables["tau_image"][visited]).all()
    assert np.isnan(tables["tau_image"][~visited]).all()
    frame = pd.DataFrame(
        {
            f"{c}_{role}": tables[f"tau_{role}"]
            if c == "tau"
            else np.isfinite(tables[f"log_u_{role}"])
            for role in ("image", "text")
            for c in ("tau", "visited")
        }
    )
    temperature_tables.plot_train_vs_held_out(frame, got, tmp_path / "tau_train_vs_held_out.png")
    assert (tmp_path / "tau_train_vs_held_out.png").stat().st_size > 1000
    with pytest.raises(analyze.AnalysisInputError, match="TempNet checkpoint"):
        isogclr = tmp_path / "isogclr.pt"
        torch.save({"loss_state_dict": {"state.tau_image": torch.ones(3)}}, isogclr)
        temperature_tables.held_out_temperatures(isogclr, tmp_path / "held_out.pt")


def test_word_frequencies_and_spearman_by_hand() -> None:
    table = temperature_tables.word_frequency_table(["a red bag", "a bag", "a red coat", "a bag"])
    # document frequencies: a 4, bag 3, red 2, coat 1
    assert list(table["rarest_word_frequency"]) == [2, 3, 1, 3]
    assert table["mean_log10_word_frequency"].iloc[1] == pytest.approx(
        (math.log10(4) + math.log10(3)) / 2
    )
    assert list(table["caption_frequency"]) == [1, 2, 1, 2]
    rho, p, n = temperature_tables.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert (rho, n) == (pytest.approx(0.8), 5)  # 1 - 6 * 4 / (5 * 24)
    assert 0.0 < p < 1.0


# ----------------------------------------------------------------------------- bad input
def test_no_shards_is_named(tmp_path: Path, smoke_run: dict) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar files"):
        shards.find_shards(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="none of its 4 files exists"):
        shards.find_shards(f"{tmp_path}/{{00000..00003}}.tar")
    with pytest.raises(FileNotFoundError, match=r"first missing: .*00004\.tar"):
        shards.find_shards(f"{smoke_run['data']['shards']}/{{00000..00005}}.tar")
    with pytest.raises(analyze.AnalysisInputError, match="no .tar files"):
        analyze.analyze(
            Path(smoke_run["checkpoints"]["isogclr"]),
            Path(smoke_run["key_index"]),
            tmp_path / "out",
            shards=str(tmp_path / "empty"),
        )
    done = subprocess.run(
        ["bash", str(SCRIPTS / "train.sh"), "clip"],
        env=dict(_env(), DATA=str(tmp_path / "empty")),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "no .tar files" in done.stderr


def test_tsv_without_url_and_caption_columns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("link\ttext\nhttps://example.com/a.jpg\ta dog\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['url', 'caption'\]"):
        tsv.check_tsv(bad)
    assert tsv.main([str(bad)]) == 2
    assert "['link', 'text']" in capsys.readouterr().err
    # Google's headerless file is recognised and given a header in a copy.
    raw = tmp_path / "raw.tsv"
    raw.write_text("a dog on grass\thttps://example.com/1.jpg\nbeach\thttp://example.com/2.jpg\n")
    assert tsv.main([str(raw)]) == 2  # needs --headered-copy
    assert tsv.main([str(raw), "--headered-copy", str(tmp_path / "with_header.tsv")]) == 0
    assert (tmp_path / "with_header.tsv").read_text().splitlines()[0] == "caption\turl"
    assert tsv.check_tsv(tmp_path / "with_header.tsv").rows == 2
    # download.sh stops at the check, before it needs img2dataset.
    done = subprocess.run(
        ["bash", str(SCRIPTS / "download.sh"), str(bad), str(tmp_path / "out")],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "no column(s) ['url', 'caption']" in done.stderr


def test_missing_evaluation_data_is_named(
    tmp_path: Path, smoke_run: dict, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = smoke_run["checkpoints"]["isogclr"]
    code = evaluate.main(
        [
            "--output",
            str(tmp_path / "eval"),
            "--checkpoint",
            checkpoint,
            "--imagenet-val",
            str(tmp_path / "imagenet"),
            "--clip-benchmark-root",
            str(tmp_path / "cb"),
            "--local-retrieval",
            str(tmp_path / "local"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"ImageNet validation folder not found: {tmp_path / 'imagenet'}" in err
    assert "wds_mscoco_captions/test/nshards.txt is missing" in err
    assert "wds_flickr30k/test/nshards.txt is missing" in err
    assert f"{tmp_path / 'local' / 'annotations.csv'} is missing" in err
    assert not (tmp_path / "eval").exists()  # nothing ran
    # Shards without dataset_type.txt would be read as a classification set.
    (tmp_path / "cb" / "wds_flickr30k" / "test").mkdir(parents=True)
    (tmp_path / "cb" / "wds_flickr30k" / "test" / "nshards.txt").write_text("1\n")
    problems = evaluate.check_clip_benchmark(tmp_path / "cb", ["flickr30k"])
    assert any("wds_flickr30k/dataset_type.txt is missing" in p for p in problems)
    with pytest.raises(evaluate.EvaluationInputError, match="checkpoint not found"):
        evaluate.parse_checkpoint(str(tmp_path / "nope.pt"), None)


def test_analysis_of_a_stateless_checkpoint_is_refused(tmp_path: Path, smoke_run: dict) -> None:
    checkpoint = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {}, "loss_name": "clip"}, checkpoint)
    with pytest.raises(analyze.AnalysisInputError, match="no loss_state_dict"):
        analyze.analyze(checkpoint, Path(smoke_run["key_index"]), tmp_path / "out")
    state = {"state.log_u_image": torch.zeros(3), "state.log_u_text": torch.zeros(3)}
    torch.save({"loss_name": "sogclr", "loss_state_dict": state, "epoch": 1}, checkpoint)
    with pytest.raises(analyze.AnalysisInputError, match="only --loss isogclr"):
        analyze.analyze(checkpoint, Path(smoke_run["key_index"]), tmp_path / "out")


def test_every_script_has_help() -> None:
    with _quiet():
        openclip_zero_shot.main(["--help"])  # prints its usage and runs nothing
    for module in (make_smoke_data, evaluate, analyze, smoke, tsv, shards):
        with pytest.raises(SystemExit) as exit_info, _quiet():
            module.main(["--help"])
        assert exit_info.value.code == 0
    for script in ("download.sh", "train.sh", "slurm.sbatch"):
        done = subprocess.run(
            ["bash", str(SCRIPTS / script), "--help"], capture_output=True, text=True, check=True
        )
        assert "Usage" in done.stdout


class _quiet:
    """Swallows what argparse prints for --help."""

    def __enter__(self) -> None:
        self._stdout, sys.stdout = sys.stdout, io.StringIO()

    def __exit__(self, *exc: object) -> None:
        sys.stdout = self._stdout


def test_model_configs_build_offline() -> None:
    import open_clip

    from recipes.cc3m import register_model_configs

    register_model_configs()
    config = open_clip.get_model_config("RN50-distilbert-size")
    text = config["text_cfg"]
    assert (text["layers"], text["width"], text["heads"]) == (6, 768, 12)  # DistilBERT's size
    assert config["vision_cfg"]["timm_model_name"] == "resnet50"
    # The recipe's model builds offline (timm's ResNet-50 without downloaded weights).
    model = open_clip.create_model("RN50-distilbert-size")
    assert sum(p.numel() for p in model.visual.parameters()) == 23_508_032 + 2048 * 256 + 256
    assert model.transformer.width == 768 and len(model.transformer.resblocks) == 6
    model = open_clip.create_model("cc3m-smoke-tiny")
    with torch.no_grad():
        image, text_features, _ = model(
            torch.zeros(2, 3, 32, 32), torch.zeros(2, 16, dtype=torch.long)
        )
    assert image.shape == text_features.shape == (2, 32)
    assert np.isfinite(image.numpy()).all()


@pytest.mark.slow
def test_smoke_tempnet_run_analyses_held_out_pairs(tmp_path: Path) -> None:
    """TempNet trained by train.sh's command, the evaluation's embeddings of the local retrieval
    pairs (never trained on) saved, and analyze.py's held-out temperatures from them."""
    import torch

    summary = smoke.run_smoke(tmp_path, losses=("tempnet",))
    embeddings = torch.load(tmp_path / "eval" / "embeddings" / "smoke-tempnet.pt")
    assert embeddings["image"].shape[0] == embeddings["text"].shape[0] > 0
    folder = Path(summary["analysis_tempnet"])
    assert (folder / "tau_train_vs_held_out.png").stat().st_size > 1000
    # The range recorded in the checkpoint bounds the held-out temperatures.
    held_out = temperature_tables.held_out_temperatures(
        Path(summary["checkpoints"]["tempnet"]),
        tmp_path / "eval" / "embeddings" / "smoke-tempnet.pt",
    )
    checkpoint = torch.load(summary["checkpoints"]["tempnet"], weights_only=False)
    kwargs = checkpoint["loss_options"]["class_kwargs"]
    for role in ("image", "text"):
        assert len(held_out[role]) == embeddings[role].shape[0]
        assert (held_out[role] >= kwargs["tau_min"] - 1e-7).all()
        assert (held_out[role] <= kwargs["tau_max"] + 1e-7).all()
