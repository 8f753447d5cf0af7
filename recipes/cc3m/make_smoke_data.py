"""Writes a small CC3M stand-in for the smoke mode: real images with captions, in img2dataset's layout.

Images are Fashion-MNIST (Debian's ``dataset-fashion-mnist``, installed offline); each caption
names the image's class in one of several templates. Classes are drawn with a long tail
(``--tail-ratio``), so caption words have very different frequencies, as in CC3M, and the
temperature analysis has something to relate to.

Output (``--output DIR``)::

    DIR/shards/00000.tar ...     members <key>.jpg, <key>.txt, <key>.json (img2dataset's)
    DIR/shards/00000.parquet     one row per attempted sample, failed ones included
    DIR/shards/00000_stats.json  img2dataset's per-shard counts
    DIR/smoke.tsv                the "URL list" the shards came from (url, caption)
    DIR/retrieval/               held-out images and captions for the local retrieval evaluation
    DIR/imagenet_val/            (with --imagenet-folder) an ImageFolder for OpenCLIP's --imagenet-val

Keys are img2dataset's (shard number, then position) and sparse: ``--failure-rate`` of the
samples are recorded as failed downloads, as real URL lists lose 10 to 20 % of their images.

Usage:
    python -m recipes.cc3m.make_smoke_data --output /tmp/cc3m_smoke
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from recipes import fashion_mnist
from recipes.cc3m.shards import compute_key

FASHION_MNIST_DIR = fashion_mnist.DEBIAN_DIR

#: Fashion-MNIST's classes in label order (``fashion_mnist.CLASS_NAMES``), as words a caption
#: would use.
CLASS_NAMES = (
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

TEMPLATES = (
    "a photo of a {}.",
    "a black and white photo of the {}.",
    "a low resolution picture of a {}",
    "{}",
    "a grayscale product image showing a {} on a dark background",
    "close-up of a {}, studio shot",
)

SHARD_DIGITS = 5  # img2dataset names shards 00000.tar ...
POSITION_DIGITS = 4  # ... and numbers samples within a shard with 4 digits (10,000 per shard)


def long_tail_class_weights(num_classes: int, tail_ratio: float) -> np.ndarray:
    """Class probabilities falling geometrically from 1 to ``tail_ratio`` (normalised)."""
    weights = tail_ratio ** (np.arange(num_classes) / max(num_classes - 1, 1))
    return weights / weights.sum()


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    """A 28x28 grayscale array as RGB JPEG bytes (img2dataset stores RGB JPEGs)."""
    buffer = io.BytesIO()
    Image.fromarray(image).convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def draw_pairs(
    labels: np.ndarray, count: int, tail_ratio: float, rng: np.random.Generator
) -> tuple[np.ndarray, list[str]]:
    """Source indices (long-tailed over classes, without repeats) and a caption for each."""
    weights = long_tail_class_weights(len(CLASS_NAMES), tail_ratio)
    classes = rng.choice(len(CLASS_NAMES), size=count, p=weights)
    by_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in range(len(CLASS_NAMES))}
    taken = {c: 0 for c in by_class}
    sources = np.empty(count, dtype=np.int64)
    for i, c in enumerate(classes):
        sources[i] = by_class[c][taken[c]]
        taken[c] += 1
    templates = rng.integers(len(TEMPLATES), size=count)
    captions = [TEMPLATES[t].format(CLASS_NAMES[c]) for t, c in zip(templates, classes)]
    return sources, captions


def write_shards(
    output: Path,
    images: np.ndarray,
    sources: np.ndarray,
    captions: list[str],
    samples_per_shard: int,
    failure_rate: float,
    rng: np.random.Generator,
) -> dict[str, int]:
    """Writes the shards, parquet and stats files as img2dataset does; returns the totals."""
    import pandas as pd  # here, so that --help answers without it
    import webdataset as wds  # imports torch: here, so that --help answers without it

    output.mkdir(parents=True, exist_ok=True)
    failed = rng.random(len(sources)) < failure_rate
    totals = {"count": 0, "successes": 0, "failed_to_download": 0}
    for shard_id, start in enumerate(range(0, len(sources), samples_per_shard)):
        stop = min(start + samples_per_shard, len(sources))
        name = f"{shard_id:0{SHARD_DIGITS}d}"
        started = time.time()
        rows = []
        with wds.TarWriter(str(output / f"{name}.tar")) as sink:
            for position, row in enumerate(range(start, stop)):
                key = compute_key(position, shard_id, POSITION_DIGITS, SHARD_DIGITS)
                meta = {
                    "url": f"fashion-mnist://train/{int(sources[row])}",
                    "caption": captions[row],
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": 28,
                    "height": 28,
                    "original_width": 28,
                    "original_height": 28,
                    "exif": None,
                    "sha256": None,
                }
                if failed[row]:
                    meta.update(status="failed_to_download", error_message="smoke: dropped")
                    meta.update(width=None, height=None, original_width=None, original_height=None)
                    rows.append(meta)
                    continue
                image = jpeg_bytes(images[sources[row]])
                meta["sha256"] = hashlib.sha256(image).hexdigest()
                rows.append(meta)
                sink.write({"__key__": key, "jpg": image, "txt": captions[row], "json": meta})
        table = pd.DataFrame(rows)
        table.to_parquet(output / f"{name}.parquet", index=False)
        successes = int((table["status"] == "success").sum())
        stats = {
            "count": len(rows),
            "successes": successes,
            "failed_to_download": len(rows) - successes,
            "failed_to_resize": 0,
            "duration": time.time() - started,
            "start_time": started,
            "end_time": time.time(),
            "status_dict": {
                "success": successes,
                **({"smoke: dropped": len(rows) - successes} if len(rows) > successes else {}),
            },
        }
        (output / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))
        for field in totals:
            totals[field] += stats[field]
    return totals


def write_retrieval_set(
    output: Path, images: np.ndarray, labels: np.ndarray, per_class: int, rng: np.random.Generator
) -> int:
    """Held-out images with one caption each: ``images/NNNN.jpg`` and ``annotations.csv``.

    Columns: ``image`` (file name), ``caption``, ``label``. The evaluation counts a caption as
    a match for every image of its class (its captions name only the class).
    """
    import pandas as pd  # here, so that --help answers without it

    (output / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for c in range(len(CLASS_NAMES)):
        for source in rng.permutation(np.flatnonzero(labels == c))[:per_class]:
            name = f"{len(rows):04d}.jpg"
            (output / "images" / name).write_bytes(jpeg_bytes(images[source]))
            caption = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(CLASS_NAMES[c])
            rows.append({"image": name, "caption": caption, "label": c})
    pd.DataFrame(rows).to_csv(output / "annotations.csv", index=False)
    return len(rows)


def write_imagenet_folder(
    output: Path, images: np.ndarray, labels: np.ndarray, per_class: int, rng: np.random.Generator
) -> int:
    """A tiny ImageFolder for exercising OpenCLIP's ``--imagenet-val`` code path.

    Its folders sort in label order, so ImageFolder's label c is read against ImageNet's
    class name c: the accuracy is meaningless, only the code path is exercised.
    """
    count = 0
    for c in range(len(CLASS_NAMES)):
        folder = output / f"class_{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for source in rng.permutation(np.flatnonzero(labels == c))[:per_class]:
            (folder / f"{count:04d}.jpg").write_bytes(jpeg_bytes(images[source]))
            count += 1
    return count


def make_smoke_data(
    output: Path,
    num_pairs: int = 400,
    samples_per_shard: int = 100,
    failure_rate: float = 0.05,
    tail_ratio: float = 0.1,
    retrieval_per_class: int = 5,
    imagenet_per_class: int = 0,
    seed: int = 0,
    fashion_mnist_dir: Path = FASHION_MNIST_DIR,
) -> dict[str, object]:
    """Writes the smoke data set under ``output``; returns a summary (counts and paths).

    Args:
        output: folder to write into
        num_pairs: image-caption pairs attempted
        samples_per_shard: samples per tar shard
        failure_rate: share recorded as failed downloads
        tail_ratio: rarest class's frequency over the commonest
        retrieval_per_class: held-out images per class for the local retrieval evaluation
        imagenet_per_class: if > 0, also write an ImageFolder for OpenCLIP's --imagenet-val code
            path
        seed: seed of the class draws, captions and failures
        fashion_mnist_dir: folder of the gzipped idx files (Debian's dataset-fashion-mnist
            installs them here)
    """
    import pandas as pd  # here, so that --help answers without it

    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}.")
    if not 1 <= samples_per_shard < 10**POSITION_DIGITS:
        raise ValueError(
            f"samples_per_shard must lie in [1, {10**POSITION_DIGITS}), got {samples_per_shard}."
        )
    if not 0.0 <= failure_rate < 1.0:
        raise ValueError(f"failure_rate must lie in [0, 1), got {failure_rate}.")
    if not 0.0 < tail_ratio <= 1.0:
        raise ValueError(f"tail_ratio must lie in (0, 1], got {tail_ratio}.")
    rng = np.random.default_rng(seed)
    train_images, train_labels = fashion_mnist.load("train", source_dir=fashion_mnist_dir)
    test_images, test_labels = fashion_mnist.load("test", source_dir=fashion_mnist_dir)
    sources, captions = draw_pairs(train_labels, num_pairs, tail_ratio, rng)
    shard_dir = output / "shards"
    totals = write_shards(
        shard_dir, train_images, sources, captions, samples_per_shard, failure_rate, rng
    )
    # The URL list the shards "came from", in the layout download.sh expects of CC3M's TSV.
    pd.DataFrame(
        {"caption": captions, "url": [f"fashion-mnist://train/{int(s)}" for s in sources]}
    ).to_csv(output / "smoke.tsv", sep="\t", index=False)
    retrieval = write_retrieval_set(
        output / "retrieval", test_images, test_labels, retrieval_per_class, rng
    )
    summary: dict[str, object] = {
        "shards": str(shard_dir),
        "num_shards": -(-num_pairs // samples_per_shard),
        **totals,
        "retrieval": str(output / "retrieval"),
        "retrieval_pairs": retrieval,
    }
    if imagenet_per_class > 0:
        summary["imagenet_val"] = str(output / "imagenet_val")
        summary["imagenet_images"] = write_imagenet_folder(
            output / "imagenet_val", test_images, test_labels, imagenet_per_class, rng
        )
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> dict[str, object]:
    from recipes.cli_args import call

    prog, description = "python -m recipes.cc3m.make_smoke_data", __doc__.split("\n\n")[0]
    summary = call(make_smoke_data, argv, prog=prog, description=description)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
