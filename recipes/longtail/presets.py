"""Published settings of the long-tail runs (``--preset``) and their CPU smoke mode (``--smoke``).

A preset fills in the option defaults of one published setting; options given on the command line
still win. The iSogCLR CIFAR recipe (docs/methods.md): ResNet-18, batch 128, LARS with learning rate
0.8, 400 epochs; iSogCLR tau_init 0.1 in [0.05, 1.0], rho 0.4, eta 0.03, beta 0.5, gamma 0.8;
NT-Xent and SogCLR at tau 0.1; DySTreSS (0.07, 0.2) on CIFAR and (0.1, 0.2) on ImageNet; the
cosine schedule of Kukleva et al. between 0.1 and 1.0. The long-tail profile is CIFAR-10-LT's at
imbalance 100.

``--smoke`` runs the same code path (the preset's backbone, optimizer, losses, augmentation
family, number of classes, DDP when ``--devices`` > 1) for two steps of one epoch on a stand-in
made from the installed Fashion-MNIST, so that it finishes in a minute on a CPU:

- ``cifar10-lt`` / ``cifar100-lt``: Fashion-MNIST images padded to 32 x 32 and repeated to three
  channels, in 10 classes or in 100 pseudo-classes (class ``10 * label + position % 10``), loaded
  where the real CIFAR arrays would be;
- ``imagenet100-lt``: the 100-pseudo-class images written as an ``ImageFolder`` tree
  (``train/`` and ``val/``, PNG) under the output folder and read through ``--dataset folder``,
  resized to 80 px (above 64 px, so ResNet-18 keeps its ImageNet stem as at 224 px).

A smoke run shows that the pipeline runs and writes its report; its accuracies mean nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

_CIFAR_RECIPE: dict[str, Any] = {
    "backbone": "resnet18",
    "optimizer": "lars",
    "lr": 0.8,
    "batch_size": 128,
    "epochs": 400,
    "imbalance": 100.0,
    "temperature": 0.1,
    "cosine_tau_min": 0.1,
    "cosine_tau_max": 1.0,
    "sogclr_gamma": 0.9,
    "isogclr_tau_init": 0.1,
    "isogclr_tau_min": 0.05,
    "isogclr_tau_max": 1.0,
    "isogclr_rho": 0.4,
    "isogclr_eta": 0.03,
    "isogclr_beta": 0.5,
    "isogclr_gamma": 0.8,
    "dystress_tau_min": 0.07,
    "dystress_tau_max": 0.2,
}

PRESETS: dict[str, dict[str, Any]] = {
    "cifar10-lt": {**_CIFAR_RECIPE, "dataset": ["cifar10"]},
    "cifar100-lt": {**_CIFAR_RECIPE, "dataset": ["cifar100"]},
    # ImageNet-100 comes as a folder the user names with --dataset folder PATH.
    "imagenet100-lt": {
        **_CIFAR_RECIPE,
        "batch_size": 256,
        "image_size": 224,
        "workers": 8,
        "dystress_tau_min": 0.1,
        "dystress_tau_max": 0.2,
    },
}

#: Classes of each preset's dataset.
PRESET_CLASSES = {"cifar10-lt": 10, "cifar100-lt": 100, "imagenet100-lt": 100}

# The smoke budget: two steps of one epoch on a few images per class.
SMOKE_MAX_PER_CLASS = 40
SMOKE_IMAGE_SIZE = 80
SMOKE_VAL_PER_CLASS = 2
SMOKE: dict[str, Any] = {
    "epochs": 1,
    "steps_per_epoch": 2,
    "max_per_class": SMOKE_MAX_PER_CLASS,
    "imbalance": float(SMOKE_MAX_PER_CLASS),  # the rarest class keeps one image
    "test_per_class": SMOKE_VAL_PER_CLASS,
    "probe_per_class": SMOKE_VAL_PER_CLASS,
    "probe_epochs": 5,
    "batch_size": 16,
    "device": "cpu",
    "precision": "32",
    "workers": 0,
    "warmup_epochs": 0,
    # The claim runs over seeds and class orders are left out of the smoke mode (the tiny job in
    # tests/test_longtail.py exercises them); --claim-seeds 0 1 adds them back.
    "claim_seeds": [],
}


def smoke_defaults(preset: Optional[str], output: Path) -> dict[str, Any]:
    """Option defaults of ``--smoke`` for ``preset`` (None: the recipe's own defaults); for
    ``imagenet100-lt`` writes the stand-in folder under ``output`` first."""
    defaults = dict(SMOKE)
    if preset == "imagenet100-lt":
        folder = output / "smoke-data" / "imagenet100-standin"
        write_standin_folder(folder, PRESET_CLASSES[preset])
        defaults.update(dataset=["folder", str(folder)], image_size=SMOKE_IMAGE_SIZE)
    return defaults


def write_standin_folder(folder: Path, num_classes: int) -> Path:
    """An ``ImageFolder`` tree (``train/<class>/*.png``, ``val/<class>/*.png``) of stand-in images.

    ``SMOKE_MAX_PER_CLASS`` training and ``SMOKE_VAL_PER_CLASS`` validation images per class,
    the first of each class in the stand-in's order. Written once; a complete tree is reused.
    """
    import torch
    from PIL import Image

    from recipes.longtail.data import standin_images

    done = folder / ".complete"
    if done.is_file():
        return folder
    for split, per_class in (("train", SMOKE_MAX_PER_CLASS), ("val", SMOKE_VAL_PER_CLASS)):
        images, targets, classes = standin_images(num_classes, train=split == "train")
        for c, name in enumerate(classes):
            target_dir = folder / split / name.replace("/", "-").replace(" ", "_")
            target_dir.mkdir(parents=True, exist_ok=True)
            chosen = torch.nonzero(targets == c).flatten()[:per_class]
            for k in chosen.tolist():
                pixels = images[k].permute(1, 2, 0).numpy()
                Image.fromarray(pixels).save(target_dir / f"{k:05d}.png")
    done.write_text("ok\n")
    return folder
