"""Tiny real image-text data and a tiny registered model for the OpenCLIP training tests.

Images are Fashion-MNIST (the Debian package's gzipped idx files), captions name the class in a
few templates ("a photo of a sneaker"), written as webdataset shards in img2dataset's layout
(``jpg``, ``txt``, ``json`` members under sparse string keys) or as a csv of image files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import open_clip
import webdataset as wds
from _dist_utils import free_port
from PIL import Image

from recipes.fashion_mnist import load as load_fashion_mnist

# Caption words for the classes in label order (``recipes.fashion_mnist.CLASS_NAMES``).
CLASS_NAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")

TINY_MODEL = "tau-tiny"
TINY_MODEL_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
# Deterministic preprocessing: a full-image crop at every draw, so runs compare bit for bit.
NO_CROP_AUGMENTATION = ["--aug-cfg", "scale=(1.0,1.0)"]


def write_tiny_model_config(directory: os.PathLike) -> Path:
    """Writes the tiny model's JSON config (``tau-tiny``) and returns its path."""
    path = Path(directory) / f"{TINY_MODEL}.json"
    path.write_text(json.dumps(TINY_MODEL_CONFIG))
    return path


def register_tiny_model(directory: os.PathLike) -> Path:
    """Writes and registers the tiny config with ``open_clip.add_model_config``."""
    path = write_tiny_model_config(directory)
    open_clip.add_model_config(path)
    return path


def fashion_mnist(num_images: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The first ``num_images`` Fashion-MNIST images (uint8, N x 28 x 28) and labels (int64).

    ``split`` is ``train`` or ``test``; :func:`recipes.fashion_mnist.load` reads the files.
    """
    return load_fashion_mnist(split, num_images)


def caption(label: int, position: int) -> str:
    """A caption that names the class, the template chosen by position."""
    return TEMPLATES[position % len(TEMPLATES)].format(CLASS_NAMES[label])


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def img2dataset_key(shard: int, position: int) -> str:
    """img2dataset's key: 5 digits of shard then 4 of position (sparse across shards)."""
    return f"{shard:05d}{position:04d}"


def write_shards(
    directory: os.PathLike,
    num_samples: int,
    samples_per_shard: int,
    corrupt_keys: Iterable[str] = (),
    key_fn=img2dataset_key,
) -> list[str]:
    """Writes Fashion-MNIST image-caption pairs as webdataset shards ``00000.tar``, ...

    Members are ``<key>.jpg``, ``<key>.txt`` and ``<key>.json`` as img2dataset writes them; the
    jpg of each key in ``corrupt_keys`` is replaced by bytes that do not decode. Returns the keys
    in write order.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pixels, labels = fashion_mnist(num_samples)
    corrupt = set(corrupt_keys)
    keys = []
    for shard_start in range(0, num_samples, samples_per_shard):
        shard = shard_start // samples_per_shard
        with wds.TarWriter(str(directory / f"{shard:05d}.tar")) as sink:
            for position, i in enumerate(
                range(shard_start, min(shard_start + samples_per_shard, num_samples))
            ):
                key = key_fn(shard, position)
                text = caption(int(labels[i]), i)
                image = b"not a jpeg" if key in corrupt else jpeg_bytes(pixels[i])
                sink.write(
                    {
                        "__key__": key,
                        "jpg": image,
                        "txt": text,
                        "json": json.dumps({"key": key, "caption": text}).encode(),
                    }
                )
                keys.append(key)
    return keys


def shard_pattern(directory: os.PathLike, num_shards: int) -> str:
    """Brace pattern over ``num_shards`` shards: ``dir/{00000..00003}.tar``."""
    return os.path.join(str(directory), f"{{00000..{num_shards - 1:05d}}}.tar")


def write_csv(directory: os.PathLike, num_samples: int, offset: int = 0) -> Path:
    """Writes images as png files and a tab-separated ``train.csv`` (``filepath``, ``title``)."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    pixels, labels = fashion_mnist(offset + num_samples)
    path = directory / "train.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "title"])
        for i in range(offset, offset + num_samples):
            image_path = directory / "images" / f"{i}.png"
            Image.fromarray(pixels[i]).convert("RGB").save(image_path)
            writer.writerow([str(image_path), caption(int(labels[i]), i)])
    return path


def loss_values(log_path: os.PathLike, name: str = "Contrastive_loss") -> list[float]:
    """The per-step ``<name>: value (average)`` values that ``open_clip_train`` logged."""
    values = []
    for line in Path(log_path).read_text().splitlines():
        if "Train Epoch" in line and f"{name}: " in line:
            values.append(float(line.split(f"{name}: ")[1].split()[0]))
    return values


def zero_shot_accuracy(
    checkpoint_path: os.PathLike, model: str = TINY_MODEL, num_images: int = 500
) -> float:
    """Class accuracy of a checkpoint on held-out Fashion-MNIST test images, classifying each
    image by its most similar prompt "a photo of a <class>." (chance: 0.1)."""
    import torch

    net, _, preprocess = open_clip.create_model_and_transforms(model)
    saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    weights = {k.removeprefix("module."): v for k, v in saved["state_dict"].items()}
    weights.pop("logit_bias", None)  # SigLIP's; a ranking by similarity does not need it
    net.load_state_dict(weights)
    net.eval()
    pixels, labels = fashion_mnist(num_images, split="test")
    images = torch.stack([preprocess(Image.fromarray(p).convert("RGB")) for p in pixels])
    prompts = open_clip.get_tokenizer(model)([f"a photo of a {c}." for c in CLASS_NAMES])
    with torch.no_grad():
        image_features = net.encode_image(images, normalize=True)
        text_features = net.encode_text(prompts, normalize=True)
    predicted = (image_features @ text_features.T).argmax(dim=1).numpy()
    return float((predicted == labels).mean())


# Environment variable read by ``python -m openclip_fixtures``: "EPOCH:STEP" makes every
# process SIGKILL itself when the loss is called for step STEP of epoch EPOCH (that many steps
# of the epoch done), as a job killed by the cluster.
KILL_AT = "OPENCLIP_TAU_TEST_KILL_AT"


def train_command(root: os.PathLike, args: Sequence[str], processes: int = 1) -> list[str]:
    """The command line of ``openclip_tau.train`` (through ``python -m openclip_fixtures``) in
    one process, or in ``processes`` gloo processes under torchrun, with the tiny model config
    of ``root`` registered in every process."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
        launcher += ["--master-port", str(free_port()), "-m", "--"]  # ours prefix torchrun's
    else:
        launcher += ["-m"]
    config = str(Path(root) / f"{TINY_MODEL}.json")
    return [*launcher, "openclip_fixtures", "--add-model-config", config, *args]


def train_process(
    root: os.PathLike,
    args: Sequence[str],
    processes: int = 1,
    kill_at: Optional[str] = None,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """Runs :func:`train_command` (optionally SIGKILLed at ``kill_at``, see :data:`KILL_AT`)
    and returns the finished process (its exit code is not checked)."""
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{tests.parent}{os.pathsep}{tests}")
    env.pop(KILL_AT, None)
    if kill_at:
        env[KILL_AT] = kill_at
    command = train_command(root, args, processes)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun_train(
    root: os.PathLike, args: Sequence[str], timeout: int = 300
) -> subprocess.CompletedProcess:
    """``openclip_tau.train`` in 2 gloo processes under torchrun, with the tiny model config of
    ``root`` registered in every process; fails with the end of stderr on a non-zero exit."""
    result = train_process(root, args, processes=2, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _main() -> None:
    """``python -m openclip_fixtures ARGS``: ``openclip_tau.train``'s console entry, killed
    with SIGKILL at the step :data:`KILL_AT` names (when set)."""
    import signal

    from openclip_tau import train

    if os.environ.get(KILL_AT):
        epoch, step = (int(x) for x in os.environ[KILL_AT].split(":"))
        real_end_step = train.LossTraining.end_step

        def end_step(self: train.LossTraining, stats: dict) -> None:
            if self.epoch == epoch and self.step_in_epoch == step:
                os.kill(os.getpid(), signal.SIGKILL)
            real_end_step(self, stats)

        train.LossTraining.end_step = end_step
    train.cli()


if __name__ == "__main__":
    _main()
