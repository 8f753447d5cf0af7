"""Evaluation: kNN and linear-probe top-1 per class group, and temperature against frequency.

- kNN: Lightly's ``knn_predict`` (weights ``exp(sim / t)``) on L2-normalised backbone features,
  with the long-tailed training set as the bank, as Lightly's benchmarks use their training set.
  A long-tailed bank favours head classes in the vote, so tail kNN accuracy mixes representation
  quality with that bias.
- Linear probe: scikit-learn's multinomial logistic regression on standardised frozen features
  of a class-balanced labelled subset of the full training split, so the probe itself is not
  biased toward head classes.
- Accuracies are per class (torchmetrics) on the balanced test split, averaged over all classes and over the
  head, middle and tail thirds of the frequency ranks.
- Temperatures (iSogCLR): the mean learned temperature of each class's training samples against
  the class's frequency, with Spearman's rank correlation and a permutation p-value
  (``recipes.temperature_analysis``, shared with the CC3M recipe).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
from lightly.utils.benchmarking import knn_predict
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.functional.classification import multiclass_confusion_matrix

from recipes.longtail.augment import normalize_images
from recipes.longtail.data import GROUP_NAMES, ImageSet, LongTailData
from recipes.temperature_analysis import quantiles, spearman


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: ImageSet,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int = 512,
    autocast_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """L2-normalised backbone features of un-augmented images, float32 on the CPU."""
    was_training = model.training
    model.eval()
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    chunks = []
    for start in range(0, len(images), batch_size):
        x = images.images[start : start + batch_size].to(device)
        x = normalize_images(x, mean_t, std_t)
        with torch.autocast(
            device_type=device.type,
            dtype=autocast_dtype or torch.float32,
            enabled=autocast_dtype is not None,
        ):
            features = model.features(x)  # type: ignore[operator]
        chunks.append(F.normalize(features.float(), dim=1).cpu())
    model.train(was_training)
    return torch.cat(chunks)


def per_class_accuracy(predictions: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Top-1 accuracy of each class (NaN for a class without test images), float64.

    From torchmetrics' confusion matrix (its counts are exact; its accuracy is float32).
    """
    counts = multiclass_confusion_matrix(predictions, targets, num_classes, validate_args=False)
    correct, total = counts.diagonal().double(), counts.sum(dim=1).double()
    return torch.where(total > 0, correct / total.clamp_min(1), torch.nan)


def group_accuracy(class_accuracy: Tensor, class_group: Sequence[str]) -> dict[str, float]:
    """Mean per-class accuracy (balanced accuracy) over all classes and each frequency group."""
    result = {"all": float(torch.nanmean(class_accuracy))}
    for group in GROUP_NAMES:
        members = [c for c, g in enumerate(class_group) if g == group]
        result[group] = float(torch.nanmean(class_accuracy[members])) if members else math.nan
    return result


def knn_predictions(
    bank: Tensor,
    bank_targets: Tensor,
    queries: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> Tensor:
    """Top-1 kNN predictions of ``queries`` with Lightly's ``knn_predict`` (chunked)."""
    k = min(k, bank.shape[0])
    bank_t = bank.T.contiguous()
    predictions = [
        knn_predict(queries[s : s + chunk], bank_t, bank_targets, num_classes, k, temperature)[:, 0]
        for s in range(0, queries.shape[0], chunk)
    ]
    return torch.cat(predictions)


def linear_probe_predictions(
    train_features: Tensor,
    train_targets: Tensor,
    test_features: Tensor,
    max_iter: int = 100,
) -> Tensor:
    """Top-1 predictions of scikit-learn's multinomial ``LogisticRegression`` (L-BFGS, L2 with
    ``C=1``, at most ``max_iter`` iterations) on frozen features standardised with the training
    features' mean and standard deviation (``StandardScaler``). Deterministic: no seed."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    with warnings.catch_warnings():  # a short budget (smoke runs) stops before convergence
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(train_features.double().numpy(), train_targets.numpy())
    return torch.from_numpy(probe.predict(test_features.double().numpy())).long()


def evaluate_features(
    train_features: Tensor,
    probe_features: Tensor,
    test_features: Tensor,
    data: LongTailData,
    knn_k: int,
    knn_t: float,
    probe_epochs: int,
    seed: int = 0,
) -> dict:
    """kNN and linear-probe accuracies (overall and per group) and per-class accuracies.

    ``probe_epochs`` caps the probe's L-BFGS iterations; ``seed`` is unused (the probe is
    deterministic) and kept for callers."""
    num_classes = data.num_classes
    knn = knn_predictions(
        train_features, data.train.targets, test_features, num_classes, knn_k, knn_t
    )
    probe = linear_probe_predictions(
        probe_features, data.probe.targets, test_features, probe_epochs
    )
    knn_class = per_class_accuracy(knn, data.test.targets, num_classes)
    probe_class = per_class_accuracy(probe, data.test.targets, num_classes)
    return {
        "knn": group_accuracy(knn_class, data.class_group),
        "probe": group_accuracy(probe_class, data.class_group),
        "knn_per_class": knn_class.tolist(),
        "probe_per_class": probe_class.tolist(),
    }


def raw_pixel_features(images: ImageSet, max_side: int = 32) -> Tensor:
    """Flattened, centred, L2-normalised pixels (downsampled to at most ``max_side`` px)."""
    x = images.images.float() / 255.0
    if x.shape[-1] > max_side:
        x = F.adaptive_avg_pool2d(x, max_side)
    x = x.flatten(start_dim=1)
    return F.normalize(x - x.mean(dim=1, keepdim=True), dim=1)


# --------------------------------------------------------------------------- temperatures
def temperature_by_class(
    tau: Tensor, targets: Tensor, data: LongTailData, permutations: int = 20000
) -> dict:
    """Per-class statistics of per-sample temperatures and their correlation with frequency.

    Args:
        tau: The temperature of every training sample (index order of ``data.train``).
        targets: Class of every training sample.
        data: For the class counts, ranks and groups.

    Returns:
        ``per_class`` (mean, std, quantiles, count, rank, group per class), ``per_group`` mean,
        ``spearman`` and ``p_value`` of class mean temperature against class count, and the
        overall ``mean``, ``min``, ``max``.
    """
    tau = tau.detach().float().cpu()
    targets = targets.cpu()
    per_class = []
    for class_id in range(data.num_classes):
        values = tau[targets == class_id]
        q = quantiles(values.numpy())
        per_class.append(
            {
                "class": class_id,
                "name": data.classes[class_id],
                "count": data.class_counts[class_id],
                "rank": data.class_rank[class_id],
                "group": data.class_group[class_id],
                "mean": float(values.mean()),
                "std": float(values.std(unbiased=False)),
                "p10": q["p10"],
                "p50": q["p50"],
                "p90": q["p90"],
            }
        )
    rho, p_value = spearman(
        [c["count"] for c in per_class], [c["mean"] for c in per_class], permutations
    )
    per_group = {}
    for group in GROUP_NAMES:
        mask = torch.tensor([data.class_group[int(t)] == group for t in range(data.num_classes)])
        in_group = mask[targets]
        per_group[group] = float(tau[in_group].mean()) if bool(in_group.any()) else math.nan
    return {
        "per_class": per_class,
        "per_group": per_group,
        "spearman": rho,
        "p_value": p_value,
        "mean": float(tau.mean()),
        "min": float(tau.min()),
        "max": float(tau.max()),
    }
