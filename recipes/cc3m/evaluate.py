"""Step 3: evaluates CC3M checkpoints and collects one comparison table beside published results.

For each ``--checkpoint`` (an OpenCLIP checkpoint, ``<logs>/<name>/checkpoints/epoch_K.pt``):

- zero-shot ImageNet through OpenCLIP's own ``--imagenet-val`` option (``--imagenet-val DIR``:
  the ILSVRC2012 validation images, one folder per class), run as
  ``python -m recipes.cc3m.openclip_zero_shot --pretrained CKPT --imagenet-val DIR ...``
  (``openclip_tau.train --loss clip``, i.e. upstream's ``open_clip_train``, which only evaluates
  when given no training data);
- MSCOCO (5k test) and Flickr30k (1k test) retrieval through the ``clip_benchmark`` package
  (``pip install clip-benchmark``; ``--clip-benchmark-root DIR`` holds its webdataset copies,
  ``DIR/wds_mscoco_captions`` and ``DIR/wds_flickr30k``, each with ``test/nshards.txt`` and
  ``test/0.tar`` ...);
- in the smoke mode, a small local retrieval set (``--local-retrieval DIR``, written by
  ``make_smoke_data``): image-to-text and text-to-image recall@1/5/10 computed with open_clip's
  model API, where a caption matches every image of the class it names.

Each evaluation is saved as ``OUTPUT/runs/<label>.json``; then ``OUTPUT/comparison.md`` and
``OUTPUT/comparison.csv`` are rebuilt from all saved runs, with the published settings below
them, marked as published. The papers' own tables are not transcribed (cells "see paper" with the
reference); the published numbers of docs/published.md (TempNet's README figure,
FastCLIP's README table) are shown as rows marked "published, theirs" with their setting where a
metric is the same as ours, and below the table where it is not.

Missing inputs (a checkpoint, the ImageNet folder, clip_benchmark, its data) are reported before
any model is loaded, each naming what is missing (exit status 2).

Usage:
    python -m recipes.cc3m.evaluate --output results/cc3m \\
        --checkpoint isogclr=logs/cc3m-isogclr/checkpoints/epoch_30.pt \\
        --imagenet-val /data/imagenet/val --clip-benchmark-root /data/clip_benchmark
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

if TYPE_CHECKING:
    import pandas as pd  # imported where used, so that --help answers without it

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Our name of each retrieval benchmark -> clip_benchmark's dataset name.
CLIP_BENCHMARK_DATASETS = {"mscoco": "mscoco_captions", "flickr30k": "flickr30k"}
RECALL_KS = (1, 5, 10)

#: Settings of the published CC3M results the table is compared with. Numbers are deliberately
#: not transcribed: read them from the cited tables.
PUBLISHED = (
    {
        "source": "iSogCLR paper: Qiu et al., ICML 2023, arXiv:2305.11965 (CC3M results)",
        "methods": ("CLIP", "SogCLR", "iSogCLR"),
        "setting": "ResNet-50 (ImageNet-pretrained) + DistilBERT (pretrained), 256 px, "
        "embed 256, global batch 512, AdamW 2e-4, wd 0.02, cosine, 30 epochs; "
        "iSogCLR rho 6.0 or 8.0, tau_init 0.01, eta 0.03, gamma 0.8",
    },
    {
        "source": "FastCLIP paper: Wei et al., 2024, arXiv:2407.01445 (CC3M, medium-scale table)",
        "methods": (
            "OpenCLIP",
            "SogCLR",
            "iSogCLR",
            "FastCLIP-v1",
            "FastCLIP-v2",
            "FastCLIP-v3",
        ),
        "setting": "RN50 (OpenCLIP config), from scratch, global batch 1024 (the FastCLIP "
        "README's CC3M setting), 37 epochs, lr 1e-3, wd 0.1, 10k warmup steps",
    },
)


#: Published numbers (theirs, from docs/published.md), each source with its setting.
#: ``metrics`` uses our column names where the metric is the same (TempNet's "image R@1" is
#: text-to-image retrieval, "text R@1" image-to-text); ``other`` holds metrics we do not compute.
PUBLISHED_NUMBERS = (
    {
        "source": "TempNet repository README (zhqiu/TempNet), Qiu et al., ICML 2024, "
        "arXiv:2404.04575, mean of 3 seeds",
        "setting": "CC3M, ResNet-50 + DistilBERT (the code base starts from pretrained towers "
        "with --init_model; these numbers suggest it was used), 30 epochs, 8 GPUs",
        "rows": {
            method: {
                "metrics": dict(
                    zip(
                        (
                            "flickr30k_t2i_r1",
                            "flickr30k_i2t_r1",
                            "mscoco_t2i_r1",
                            "mscoco_i2t_r1",
                            "imagenet_top1",
                        ),
                        values[:2] + values[2:4] + values[6:],
                    )
                ),
                "other": {
                    "CIFAR-10 zero-shot top-1": values[4],
                    "CIFAR-100 zero-shot top-1": values[5],
                },
            }
            for method, values in (
                ("CLIP", (40.98, 50.90, 21.32, 26.98, 60.63, 30.70, 36.27)),
                ("CyCLIP", (42.46, 51.70, 21.58, 26.18, 57.19, 33.11, 36.75)),
                ("SogCLR", (43.32, 57.18, 22.43, 30.08, 61.09, 33.26, 37.46)),
                ("iSogCLR", (44.36, 60.20, 23.27, 32.72, 58.91, 33.81, 40.72)),
                ("TempNet", (46.17, 62.51, 24.83, 34.50, 61.77, 34.69, 42.28)),
            )
        },
    },
    {
        "source": "FastCLIP repository README (Optimization-AI/fast_clip), Wei et al. 2024, "
        "arXiv:2407.01445, mean (std) over seeds",
        "setting": "CC3M medium (2,723,840 pairs), ResNet-50 from scratch, global batch 1024, "
        "37 epochs, lr 1e-3, wd 0.1, 10k warm-up steps; DataComp evaluation suite",
        "rows": {
            method: {
                "metrics": {},
                "other": {
                    "DataComp average": values[0],
                    "retrieval average": values[1],
                    "ImageNet & variants average": values[2],
                },
            }
            for method, values in (
                ("SogCLR (constant gamma)", ("23.41 (0.34)", "27.48 (0.24)", "16.90 (0.01)")),
                (
                    "FastCLIP-v1 (SogCLR + cosine gamma)",
                    ("24.87 (0.13)", "29.28 (0.30)", "18.86 (0.09)"),
                ),
                ("iSogCLR (constant gamma)", ("23.35 (0.63)", "27.92 (0.34)", "17.05 (0.14)")),
                (
                    "FastCLIP-v2 (iSogCLR + cosine gamma)",
                    ("24.10 (0.34)", "29.32 (1.29)", "18.52 (0.37)"),
                ),
            )
        },
        "note": "FastCLIP-v3 (RGCL-g) against OpenCLIP's ClipLoss, ImageNet & variants average, "
        "read off the README's plot: about 18.4 to 19.2 against 14.2 to 16.0 (+4.21 / +4.35 / "
        "+3.97 / +3.17 at 1 / 2 / 4 / 8 nodes of 4 GPUs).",
    },
)


class EvaluationInputError(ValueError):
    """An input of the evaluation is missing; the message names each missing thing."""


@dataclass
class CheckpointSpec:
    label: str
    path: Path
    model: str


# ----------------------------------------------------------------------------- input checks
def parse_checkpoint(spec: str, model: Optional[str]) -> CheckpointSpec:
    """``LABEL=PATH`` or ``PATH``; the model comes from ``--model`` or the run's params.txt."""
    label, sep, path_text = spec.partition("=")
    if not sep:
        label, path_text = "", spec
    path = Path(path_text)
    if not path.is_file():
        raise EvaluationInputError(f"checkpoint not found: {path}")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if not label:
        label = f"{run_dir.name}-{path.stem}"
    if not re.fullmatch(r"[\w.+-]+", label):
        raise EvaluationInputError(
            f"checkpoint label {label!r} may hold only letters, digits and . _ + -"
        )
    if model is None:
        model = model_from_params(run_dir / "params.txt")
        if model is None:
            raise EvaluationInputError(
                f"no model name for {path}: pass --model (the run's params.txt, "
                f"{run_dir / 'params.txt'}, is missing or names no model)"
            )
    return CheckpointSpec(label, path, model)


def model_from_params(params: Path) -> Optional[str]:
    """The ``model`` entry of the ``params.txt`` that OpenCLIP writes into each run folder."""
    if not params.is_file():
        return None
    for line in params.read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model" and value.strip():
            return value.strip()
    return None


def check_imagenet_folder(folder: Path) -> list[str]:
    if not folder.is_dir():
        return [
            f"ImageNet validation folder not found: {folder} (OpenCLIP's --imagenet-val reads "
            "the ILSVRC2012 validation images sorted into one folder per class)"
        ]
    if not any(child.is_dir() for child in folder.iterdir()):
        return [
            f"ImageNet validation folder {folder} has no class folders (OpenCLIP's "
            "--imagenet-val reads one folder per class, e.g. n01440764/)"
        ]
    return []


def clip_benchmark_folder(root: Path, dataset: str) -> Path:
    """Where clip_benchmark's webdataset copy of ``dataset`` is expected under ``root``."""
    return root / f"wds_{CLIP_BENCHMARK_DATASETS[dataset]}"


def check_clip_benchmark(root: Path, datasets: Sequence[str]) -> list[str]:
    problems = []
    try:
        import clip_benchmark  # noqa: F401
    except ImportError:
        problems.append(
            "clip_benchmark is not installed (pip install clip-benchmark); it computes the "
            "MSCOCO and Flickr30k retrieval metrics"
        )
    for dataset in datasets:
        folder = clip_benchmark_folder(root, dataset)
        kind = folder / "dataset_type.txt"
        if not (folder / "test" / "nshards.txt").is_file():
            problems.append(
                f"{dataset} retrieval data not found: {folder / 'test' / 'nshards.txt'} is "
                f"missing. Fetch clip_benchmark's webdataset copy into {folder}, e.g. "
                f"huggingface-cli download --repo-type dataset "
                f"clip-benchmark/wds_{CLIP_BENCHMARK_DATASETS[dataset]} --local-dir {folder}"
            )
        elif not kind.is_file() or kind.read_text().strip().lower() != "retrieval":
            # Without it clip_benchmark reads the shards as a classification set.
            problems.append(f"{kind} is missing or does not say 'retrieval'")
    return problems


def check_local_retrieval(folder: Path) -> list[str]:
    annotations = folder / "annotations.csv"
    if not annotations.is_file():
        return [
            f"local retrieval set not found: {annotations} is missing (write one with "
            "python -m recipes.cc3m.make_smoke_data)"
        ]
    import pandas as pd

    table = pd.read_csv(annotations)
    missing_columns = [c for c in ("image", "caption", "label") if c not in table.columns]
    if missing_columns:
        return [f"{annotations} has no column(s) {missing_columns}"]
    missing_images = [n for n in table["image"] if not (folder / "images" / n).is_file()]
    if missing_images:
        return [
            f"{len(missing_images)} images of {annotations} are missing from "
            f"{folder / 'images'} (first: {missing_images[0]})"
        ]
    return []


# ----------------------------------------------------------------------------- metrics
def recall_at_k(scores: Any, positive: Any, ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
    """Percentage of queries (rows) with at least one positive among their top-k candidates.

    ``scores`` and ``positive`` are (queries, candidates) tensors; this is the retrieval
    recall of CLIP papers and of clip_benchmark (a query counts once however many positives):
    torchmetrics' ``RetrievalHitRate``.
    """
    import torch
    from torchmetrics.retrieval import RetrievalHitRate

    queries = torch.arange(scores.shape[0]).repeat_interleave(scores.shape[1])
    flat = scores.flatten(), positive.flatten()
    return {k: 100.0 * RetrievalHitRate(top_k=k)(*flat, indexes=queries).item() for k in ks}


def local_retrieval(
    model: Any,
    preprocess: Any,
    tokenizer: Any,
    folder: Path,
    device: str,
    batch_size: int = 64,
    embeddings_path: Optional[Path] = None,
) -> dict[str, float]:
    """Recall@1/5/10 both ways on the local set; a caption matches every image of its class.

    With ``embeddings_path`` the set's image and text embeddings are saved there as
    ``{"image": (n, d), "text": (n, d)}``: held-out pairs for ``analyze.py --held-out-embeddings``.
    """
    import pandas as pd
    import torch
    import torch.nn.functional as F
    from PIL import Image

    table = pd.read_csv(folder / "annotations.csv")
    image_features, text_features = [], []
    with torch.no_grad():
        for start in range(0, len(table), batch_size):
            rows = table.iloc[start : start + batch_size]
            images = torch.stack(
                [preprocess(Image.open(folder / "images" / name)) for name in rows["image"]]
            ).to(device)
            texts = tokenizer(list(rows["caption"])).to(device)
            image_features.append(F.normalize(model.encode_image(images).float(), dim=-1).cpu())
            text_features.append(F.normalize(model.encode_text(texts).float(), dim=-1).cpu())
    images_emb, texts_emb = torch.cat(image_features), torch.cat(text_features)
    if embeddings_path is not None:
        embeddings_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"image": images_emb, "text": texts_emb}, embeddings_path)
    labels = torch.tensor(table["label"].to_numpy().copy())
    positive = labels[:, None] == labels[None, :]  # images (rows) x captions (columns)
    scores = images_emb @ texts_emb.T
    metrics = {}
    for k, value in recall_at_k(scores, positive).items():
        metrics[f"local_i2t_r{k}"] = value
    for k, value in recall_at_k(scores.T, positive.T).items():
        metrics[f"local_t2i_r{k}"] = value
    return metrics


def clip_benchmark_retrieval(
    model: Any,
    preprocess: Any,
    tokenizer: Any,
    dataset: str,
    root: Path,
    device: str,
    batch_size: int,
    workers: int,
    amp: bool,
) -> dict[str, float]:
    """MSCOCO or Flickr30k retrieval with clip_benchmark's own dataset builder and metric."""
    import torch
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_retrieval

    data = build_dataset(
        dataset_name=f"wds/{CLIP_BENCHMARK_DATASETS[dataset]}",
        root=str(clip_benchmark_folder(root, dataset)),
        transform=preprocess,
        split="test",
        download=False,
        task="zeroshot_retrieval",
    )
    loader = torch.utils.data.DataLoader(
        data.batched(batch_size), batch_size=None, shuffle=False, num_workers=workers
    )
    raw = zeroshot_retrieval.evaluate(
        model, loader, tokenizer, device=device, amp=amp, recall_k_list=list(RECALL_KS)
    )
    # clip_benchmark: "text_retrieval" = image query -> captions, "image_retrieval" = the reverse.
    metrics = {}
    for k in RECALL_KS:
        metrics[f"{dataset}_i2t_r{k}"] = 100.0 * raw[f"text_retrieval_recall@{k}"]
        metrics[f"{dataset}_t2i_r{k}"] = 100.0 * raw[f"image_retrieval_recall@{k}"]
    return metrics


def imagenet_zero_shot(
    spec: CheckpointSpec,
    imagenet_val: Path,
    work_dir: Path,
    batch_size: int,
    workers: int,
    precision: str,
) -> dict[str, float]:
    """Zero-shot ImageNet top-1/top-5 through OpenCLIP's ``--imagenet-val``, in a subprocess."""
    name = f"imagenet-{spec.label}"
    shutil.rmtree(work_dir / name, ignore_errors=True)  # OpenCLIP refuses an existing run name
    command = [
        sys.executable,
        "-m",
        "recipes.cc3m.openclip_zero_shot",
        "--model",
        spec.model,
        "--pretrained",
        str(spec.path.resolve()),
        "--imagenet-val",
        str(imagenet_val.resolve()),
        "--zeroshot-frequency",
        "1",
        "--batch-size",
        str(batch_size),
        "--workers",
        str(workers),
        "--precision",
        precision,
        "--logs",
        str(work_dir.resolve()),
        "--name",
        name,
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    results = work_dir / name / "checkpoints" / "results.jsonl"
    if done.returncode != 0 or not results.is_file():
        raise RuntimeError(
            f"OpenCLIP's zero-shot ImageNet evaluation failed (exit {done.returncode}):\n"
            + (done.stdout + done.stderr)[-3000:]
        )
    last = json.loads(results.read_text().strip().splitlines()[-1])
    return {
        "imagenet_top1": 100.0 * last["imagenet-zeroshot-val-top1"],
        "imagenet_top5": 100.0 * last["imagenet-zeroshot-val-top5"],
    }


# ----------------------------------------------------------------------------- one checkpoint
def checkpoint_info(path: Path) -> dict[str, Any]:
    """Epoch and loss recorded in an OpenCLIP checkpoint (loss ``clip`` when none is recorded)."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    info: dict[str, Any] = {"checkpoint": str(path)}
    if isinstance(checkpoint, dict):
        info["epoch"] = checkpoint.get("epoch")
        info["loss"] = checkpoint.get("loss_name", "clip")
    return info


def evaluate_checkpoint(
    spec: CheckpointSpec,
    output: Path,
    imagenet_val: Optional[Path] = None,
    clip_benchmark_root: Optional[Path] = None,
    datasets: Sequence[str] = tuple(CLIP_BENCHMARK_DATASETS),
    local_retrieval_dir: Optional[Path] = None,
    device: Optional[str] = None,
    batch_size: int = 64,
    workers: int = 4,
    precision: Optional[str] = None,
    save_embeddings: bool = False,
) -> dict[str, Any]:
    """Runs the requested evaluations of one checkpoint and saves ``output/runs/<label>.json``.

    With ``save_embeddings``, the local retrieval set's embeddings go to
    ``output/embeddings/<label>.pt`` (held-out pairs for ``analyze.py --held-out-embeddings``).
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = precision or ("amp" if device.startswith("cuda") else "fp32")
    result: dict[str, Any] = {
        "label": spec.label,
        "model": spec.model,
        **checkpoint_info(spec.path),
    }
    if imagenet_val is not None:
        result.update(
            imagenet_zero_shot(
                spec, imagenet_val, output / "openclip_logs", batch_size, workers, precision
            )
        )
    if clip_benchmark_root is not None or local_retrieval_dir is not None:
        import open_clip

        from recipes.cc3m import register_model_configs

        register_model_configs()
        # weights_only=False: the user's own training checkpoints also hold the optimizer and
        # loss state, which are not plain tensors.
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.model, pretrained=str(spec.path), device=device, weights_only=False
        )
        model.eval()
        tokenizer = open_clip.get_tokenizer(spec.model)
        if local_retrieval_dir is not None:
            embeddings = output / "embeddings" / f"{spec.label}.pt" if save_embeddings else None
            result.update(
                local_retrieval(
                    model,
                    preprocess,
                    tokenizer,
                    local_retrieval_dir,
                    device,
                    embeddings_path=embeddings,
                )
            )
        if clip_benchmark_root is not None:
            for dataset in datasets:
                result.update(
                    clip_benchmark_retrieval(
                        model,
                        preprocess,
                        tokenizer,
                        dataset,
                        clip_benchmark_root,
                        device,
                        batch_size,
                        workers,
                        amp=precision == "amp",
                    )
                )
    (output / "runs").mkdir(parents=True, exist_ok=True)
    (output / "runs" / f"{spec.label}.json").write_text(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- the table
METRIC_COLUMNS = ["imagenet_top1", "imagenet_top5"] + [
    f"{dataset}_{direction}_r{k}"
    for dataset in CLIP_BENCHMARK_DATASETS
    for direction in ("i2t", "t2i")
    for k in RECALL_KS
]
LOCAL_COLUMNS = [f"local_{direction}_r{k}" for direction in ("i2t", "t2i") for k in RECALL_KS]
HEADERS = {
    "imagenet_top1": "ImageNet zero-shot top-1",
    "imagenet_top5": "ImageNet zero-shot top-5",
    **{
        f"{d}_{direction}_r{k}": f"{name} {arrow} R@{k}"
        for d, name in (("mscoco", "MSCOCO"), ("flickr30k", "Flickr30k"), ("local", "local"))
        for direction, arrow in (("i2t", "I→T"), ("t2i", "T→I"))
        for k in RECALL_KS
    },
}


def build_table(output: Path) -> pd.DataFrame:
    """Our saved runs, then the published settings, as one table; writes .md and .csv."""
    runs = [json.loads(p.read_text()) for p in sorted((output / "runs").glob("*.json"))]
    local_used = any(any(c in run for c in LOCAL_COLUMNS) for run in runs)
    metrics = METRIC_COLUMNS + (LOCAL_COLUMNS if local_used else [])
    rows = []
    for run in runs:
        row = {
            "source": "ours",
            "run": run["label"],
            "method": run.get("loss", ""),
            "model": run.get("model", ""),
            "epoch": run.get("epoch", ""),
        }
        for column in metrics:
            row[column] = f"{run[column]:.2f}" if column in run else "not run"
        rows.append(row)
    for published in PUBLISHED:
        for method in published["methods"]:
            row = {
                "source": f"published ({published['source']})",
                "run": "",
                "method": method,
                "model": published["setting"],
                "epoch": "",
            }
            for column in metrics:
                is_local = column.startswith("local_")
                row[column] = "n/a" if is_local else "see paper"
            rows.append(row)
    for published in PUBLISHED_NUMBERS:
        for method, numbers in published["rows"].items():
            if not numbers["metrics"]:
                continue
            row = {
                "source": f"published numbers ({published['source']})",
                "run": "",
                "method": method,
                "model": published["setting"],
                "epoch": "",
            }
            for column in metrics:
                value = numbers["metrics"].get(column)
                row[column] = "n/a" if value is None else f"{value:.2f}"
            rows.append(row)
    import pandas as pd

    table = pd.DataFrame(rows, columns=["source", "run", "method", "model", "epoch", *metrics])
    output.mkdir(parents=True, exist_ok=True)
    table.to_csv(output / "comparison.csv", index=False)
    (output / "comparison.md").write_text(markdown_table(table, runs))
    return table


def markdown_table(table: pd.DataFrame, runs: list[dict[str, Any]]) -> str:
    """The table as Markdown; published rows point to a numbered reference with their setting."""
    sources = [p["source"] for p in PUBLISHED] + [p["source"] for p in PUBLISHED_NUMBERS]
    references = {source: n for n, source in enumerate(sources, start=1)}
    columns = list(table.columns)
    lines = [
        "# CC3M: our runs beside the published results",
        "",
        "Rows marked *published* are the papers' results, not ours: their numbers are not "
        'copied here ("see paper"), read them from the cited tables. Our retrieval numbers are '
        "recall in percent (clip_benchmark's MSCOCO 5k and Flickr30k 1k test splits); "
        '"not run" marks an evaluation that was not asked for.',
        "",
        "| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for _, row in table.iterrows():
        cells = {c: str(row[c]).replace("|", "/") for c in columns}
        if row["source"] != "ours":
            source = row["source"].split(" (", 1)[1][:-1]
            ref = f"[{references[source]}]"
            theirs = "published, theirs" if "numbers" in row["source"] else "published"
            cells["source"] = f"*{theirs} {ref}*"
            cells["model"] = f"setting of {ref}"
            cells.update({c: f"see paper {ref}" for c in columns if cells[c] == "see paper"})
        lines.append("| " + " | ".join(cells[c] for c in columns) + " |")
    if not runs:
        lines += ["", "No runs evaluated yet."]
    lines += published_numbers_markdown(references)
    lines += ["", "Published settings:", ""]
    for published in (*PUBLISHED, *PUBLISHED_NUMBERS):
        n = references[published["source"]]
        lines.append(f"- [{n}] {published['source']}. Setting: {published['setting']}.")
    return "\n".join(lines) + "\n"


def _number(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def published_numbers_markdown(references: dict[str, int]) -> list[str]:
    """Their results in metrics this evaluation does not compute, marked as theirs."""
    lines = [
        "",
        "Published results in metrics we do not compute (theirs, not ours; their settings):",
    ]
    for published in PUBLISHED_NUMBERS:
        ref = references[published["source"]]
        names = list(next(iter(published["rows"].values()))["other"])
        lines += ["", f"| method (published [{ref}]) | " + " | ".join(names) + " |"]
        lines.append("|" + "|".join("---" for _ in range(len(names) + 1)) + "|")
        for method, numbers in published["rows"].items():
            cells = [_number(numbers["other"][name]) for name in names]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        if "note" in published:
            lines += ["", f"[{ref}] {published['note']}"]
    return lines


# ----------------------------------------------------------------------------- command line
@dataclass
class EvaluateOptions:
    """What to evaluate and how (the flags besides ``--output`` and ``--checkpoint``).

    Args:
        model: open_clip model name (default: the run's params.txt)
        imagenet_val: ImageNet validation folder
        clip_benchmark_root: clip_benchmark data folder
        datasets: clip_benchmark retrieval datasets to run
        local_retrieval: local retrieval set (smoke mode)
        save_embeddings: save the local retrieval set's image and text embeddings as
            OUTPUT/embeddings/<label>.pt (held-out pairs for analyze.py --held-out-embeddings)
        device: cuda or cpu (default: cuda when available)
        batch_size: images per batch
        workers: data loader workers
        precision: default: amp on GPU, fp32 on CPU
    """

    model: Optional[str] = None
    imagenet_val: Optional[Path] = None
    clip_benchmark_root: Optional[Path] = None
    datasets: list[Literal["mscoco", "flickr30k"]] = field(
        default_factory=lambda: list(CLIP_BENCHMARK_DATASETS)
    )
    local_retrieval: Optional[Path] = None
    save_embeddings: bool = False
    device: Optional[str] = None
    batch_size: int = 64
    workers: int = 4
    precision: Optional[Literal["amp", "fp32", "bf16"]] = None


def parse_args(argv: Optional[Sequence[str]]) -> Any:
    """The command line, generated from :class:`EvaluateOptions` (imports no torch)."""
    from recipes.cli_args import ArgumentParser, RawDescription, add_dataclass

    parser = ArgumentParser(
        prog="python -m recipes.cc3m.evaluate",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=RawDescription,
    )
    parser.add_argument("--output", type=Path, required=True, help="folder for runs/ and tables")
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="[LABEL=]PATH",
        help="checkpoint to evaluate (repeatable); without any, only the table is rebuilt",
    )
    add_dataclass(parser, EvaluateOptions, title="evaluations")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        specs = [parse_checkpoint(spec, args.model) for spec in args.checkpoint]
        problems: list[str] = []
        if args.imagenet_val is not None:
            problems += check_imagenet_folder(args.imagenet_val)
        if args.clip_benchmark_root is not None:
            problems += check_clip_benchmark(args.clip_benchmark_root, args.datasets)
        if args.local_retrieval is not None:
            problems += check_local_retrieval(args.local_retrieval)
        if problems:
            raise EvaluationInputError("; ".join(problems))
    except EvaluationInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for spec in specs:
        result = evaluate_checkpoint(
            spec,
            args.output,
            imagenet_val=args.imagenet_val,
            clip_benchmark_root=args.clip_benchmark_root,
            datasets=args.datasets,
            local_retrieval_dir=args.local_retrieval,
            device=args.device,
            batch_size=args.batch_size,
            workers=args.workers,
            precision=args.precision,
            save_embeddings=args.save_embeddings,
        )
        print(json.dumps(result, indent=2))
    build_table(args.output)
    print(f"wrote {args.output / 'comparison.md'} and {args.output / 'comparison.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
