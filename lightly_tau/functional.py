"""The temperature math, written once for one block of anchors against candidates.

Every loss in this package (unimodal and image-text, Lightly and OpenCLIP) reduces to a similarity
block ``sim`` of shape (rows, cols): one row per anchor, one column per candidate, with the column of
each anchor's positive (``pos_col``) and, for unimodal SimCLR, the anchor's own column (``self_col``)
that must not count as a negative. The functions here take such a block plus the anchors' rows of
per-sample state and return the surrogate's coefficients and the new state rows. They do no I/O and
no distributed communication, so they are easy to test against NumPy loops.

All state math runs in float32 under ``torch.no_grad``; only the surrogate's value carries a gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# A finite stand-in for -inf at excluded columns: exp() of it is exactly 0, and 0 times it is 0
# (with a true -inf the product would be NaN).
_EXCLUDED = -1.0e30


def dystress_temperature(similarity: Tensor, tau_min: float, tau_max: float) -> Tensor:
    """Temperature of each pair as a cosine function of its similarity (DySTreSS).

    ``tau(s) = tau_min + 0.5 * (tau_max - tau_min) * (1 + cos(pi * (1 + s)))``
    ``       = tau_min + (tau_max - tau_min) * sin(pi * s / 2) ** 2``

    U-shaped: ``tau_max`` at ``s = +-1``, ``tau_min`` at ``s = 0``. The similarity is clamped to
    [-1, 1] first (half-precision dot products can exceed 1) and the result is detached: the
    temperature scales a logit, it is not trained through.

    Reference: Manna et al., "Dynamically Scaled Temperature in Self-Supervised Contrastive
    Learning", IEEE TAI 2025, arXiv 2308.01140.

    Examples:
        >>> s = torch.tensor([-1.0, 0.0, 0.5, 1.0])
        >>> dystress_temperature(s, tau_min=0.1, tau_max=0.2)
        tensor([0.2000, 0.1000, 0.1500, 0.2000])
    """
    with torch.no_grad():
        s = similarity.detach().float().clamp(-1.0, 1.0)
        return torch.sin(s * (math.pi / 2)).square_().mul_(tau_max - tau_min).add_(tau_min)


def cosine_gamma(epoch: int, gamma_min: float, decay_epochs: int) -> float:
    """Moving-average weight for ``epoch`` under FastCLIP's cosine decay.

    ``gamma_e = gamma_min + (1 - gamma_min) * 0.5 * (1 + cos(pi * e / decay_epochs))`` for
    ``e < decay_epochs`` (so 1.0 at epoch 0: the estimate starts from the batch alone), then
    ``gamma_min``. Reference: Wei et al., FastCLIP, arXiv 2407.01445.
    """
    if decay_epochs <= 0 or epoch >= decay_epochs:
        return gamma_min
    return gamma_min + (1.0 - gamma_min) * 0.5 * (1.0 + math.cos(math.pi * epoch / decay_epochs))


@dataclass
class GCLRows:
    """Result of :func:`global_contrastive_rows` for each anchor row (all detached).

    Attributes:
        coef: (rows, cols) surrogate coefficients: ``w_iz`` at negatives, ``-sum_z w_iz`` at the
            positive, 0 elsewhere. ``sum(coef * sim) / num_negatives`` is the surrogate, whose
            gradient with respect to ``sim`` is ``coef / num_negatives``.
        log_u: (rows,) the new moving average in log space, ``log(u_i)``.
        grad_tau: (rows,) derivative of the row's robust objective with respect to its temperature,
            ``log(u_i) + rho - mean_z w_iz * h_iz / tau_i`` (unclipped).
        objective: (rows,) estimate of the row's objective ``tau_i * (log(u_i) + rho)``.
        num_negatives: the number of negatives per row.
    """

    coef: Tensor
    log_u: Tensor
    grad_tau: Tensor
    objective: Tensor
    num_negatives: int


@torch.no_grad()
def global_contrastive_rows(
    sim: Tensor,
    pos_col: Tensor,
    self_col: Optional[Tensor],
    tau: Tensor,
    log_u: Tensor,
    gamma: float,
    rho: float = 0.0,
    need_grad_tau: bool = True,
) -> GCLRows:
    """Moving-average update, surrogate weights and temperature gradient for one block.

    For anchor ``i`` with positive ``p`` and negatives ``z`` (every column except ``pos_col[i]``
    and ``self_col[i]``), with ``h_iz = sim[i, z] - sim[i, p]`` and ``d_iz = h_iz / tau_i``::

        g_i   = mean_z exp(d_iz)
        u_i  <- (1 - gamma) * u_i + gamma * g_i          (gamma = 1 where u_i was never set)
        w_iz  = exp(d_iz) / u_i
        grad_tau_i = log(u_i) + rho - mean_z w_iz * d_iz

    ``u`` is kept as ``log(u)``. At tau = 0.005, ``exp(d)`` reaches exp(400) and overflows float32;
    the published code subtracts a running maximum ``b_i`` and stores ``u * exp(-b)`` beside ``b``.
    Storing ``log(u)`` is that same shift taken to its end (``log(u) = log(u * exp(-b)) + b``): the
    update is a ``logaddexp`` and every exponent below is bounded, so no separate ``b`` is stored.

    Args:
        sim: (rows, cols) cosine similarities, float32, without autograd history.
        pos_col: (rows,) int64 column of each row's positive.
        self_col: (rows,) int64 column of the anchor itself (excluded), or None.
        tau: (rows,) temperature of each row.
        log_u: (rows,) stored ``log(u)``; ``-inf`` marks a sample never seen, whose update uses
            gamma = 1.
        gamma: weight of the new batch estimate in the moving average, in (0, 1].
        rho: KL radius of iSogCLR's robust objective (0 for SogCLR).
        need_grad_tau: compute ``grad_tau`` (iSogCLR) or leave it as zeros (SogCLR).
    """
    rows, cols = sim.shape
    arange = torch.arange(rows, device=sim.device)
    pos_sim = sim[arange, pos_col]
    num_neg = cols - 1 - (0 if self_col is None else 1)
    if num_neg < 1:
        raise ValueError(
            "the (global) batch needs at least 2 samples so that anchors have negatives."
        )

    # d = (sim - sim_pos) / tau, with excluded columns set so that exp() gives exactly 0.
    d = (sim - pos_sim[:, None]).div_(tau[:, None])
    d[arange, pos_col] = _EXCLUDED
    if self_col is not None:
        d[arange, self_col] = _EXCLUDED

    log_g = torch.logsumexp(d, dim=1) - math.log(num_neg)
    first_visit = torch.isneginf(log_u)
    gamma_row = torch.where(first_visit, torch.ones_like(log_u), torch.full_like(log_u, gamma))
    # log((1 - gamma) * u + gamma * g); the first term is -inf on a first visit (gamma 1, u 0).
    new_log_u = torch.logaddexp(torch.log1p(-gamma_row) + log_u, torch.log(gamma_row) + log_g)

    # log_w = d - log(u) in place; w <= num_neg / gamma: bounded whatever tau is.
    log_w = d.sub_(new_log_u[:, None])
    w = log_w.exp()
    sum_w = w.sum(dim=1)
    if need_grad_tau:
        # log(u) + rho - mean(w * d) written as rho + log(u) * (1 - mean w) - mean(w * log w):
        # at tau 0.005 log(u) and mean(w * d) are both near 400, and their float32 difference
        # would lose about 1e-3 of a gradient of order 1.
        # einsum is a batched matmul, which autocast would run in bfloat16 (a temperature
        # gradient off by 0.4 at tau 0.005); the temperature math stays in float32.
        with torch.autocast(device_type=sim.device.type, enabled=False):
            mean_w_log_w = torch.einsum("ij,ij->i", w, log_w) / num_neg
        grad_tau = rho + new_log_u * (1.0 - sum_w / num_neg) - mean_w_log_w
    else:
        grad_tau = torch.zeros_like(new_log_u)
    del d, log_w
    # The positive's coefficient: d/d sim_ip of sum_z w_iz (sim_iz - sim_ip) is -sum_z w_iz.
    w[arange, pos_col] = -sum_w
    objective = tau * (new_log_u + rho)
    return GCLRows(w, new_log_u, grad_tau, objective, num_neg)


@torch.no_grad()
def temperature_step(
    tau: Tensor,
    momentum: Tensor,
    grad_tau: Tensor,
    eta: float,
    beta: float,
    grad_clip: float,
    tau_min: float,
    tau_max: float,
) -> tuple[Tensor, Tensor]:
    """iSogCLR's per-sample temperature update with momentum.

    ``m <- (1 - beta) * m + beta * clamp(grad_tau, -c, c)``;
    ``tau <- clamp(tau - eta * m, tau_min, tau_max)``.

    Returns the new ``(tau, momentum)``.
    """
    grad = grad_tau.clamp(-grad_clip, grad_clip)
    new_m = momentum.mul(1.0 - beta).add_(grad, alpha=beta)
    new_tau = (tau - eta * new_m).clamp_(tau_min, tau_max)
    return new_tau, new_m


class _WeightedSimilaritySum(torch.autograd.Function):
    """``sum(coef * sim)`` that keeps only ``coef`` (a constant) for the backward pass.

    Autograd's own ``(coef * sim).sum()`` would allocate a (rows, cols) product; this does not,
    and the backward pass needs nothing but ``coef``.
    """

    @staticmethod
    def forward(ctx, sim: Tensor, coef: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(coef)
        return torch.dot(sim.reshape(-1), coef.reshape(-1))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (coef,) = ctx.saved_tensors
        return coef * grad, None


def weighted_similarity_sum(sim: Tensor, coef: Tensor) -> Tensor:
    """``sum(coef * sim)`` with gradient ``coef`` with respect to ``sim``; ``coef`` is constant."""
    return _WeightedSimilaritySum.apply(sim, coef)


def with_value(gradient_source: Tensor, value: Tensor) -> Tensor:
    """A scalar whose value is ``value`` and whose gradient is that of ``gradient_source``.

    The global contrastive surrogate has the right gradient but a meaningless value (it can be
    negative); the losses return the objective estimate as the value so that the logged loss
    curve means something, while backpropagation still follows the surrogate.
    """
    return gradient_source + (value - gradient_source).detach()
