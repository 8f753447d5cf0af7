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
from typing import Iterator, Optional

import torch
from torch import Tensor

# A finite stand-in for -inf at excluded columns: exp() of it is exactly 0, and 0 times it is 0
# (with a true -inf the product would be NaN).
_EXCLUDED = -1.0e30

# Scratch size of one CPU slab of rows in global_contrastive_rows (4 MiB of float32).
_CPU_SLAB_ELEMENTS = 1 << 18


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
            positive, 0 elsewhere (None from the tiled path, which never holds them whole). ``sum(coef * sim) / num_negatives`` is the surrogate, whose
            gradient with respect to ``sim`` is ``coef / num_negatives``.
        log_u: (rows,) the new moving average in log space, ``log(u_i)``.
        grad_tau: (rows,) derivative of the row's robust objective with respect to its temperature,
            ``log(u_i) + rho - mean_z w_iz * h_iz / tau_i`` (unclipped).
        objective: (rows,) estimate of the row's objective ``tau_i * (log(u_i) + rho)``.
        num_negatives: the number of negatives per row.
    """

    coef: Optional[Tensor]
    log_u: Tensor
    grad_tau: Tensor
    objective: Tensor
    num_negatives: int


def _row_slabs(sim: Tensor) -> Iterator[slice]:
    """Row ranges in which a (rows, cols) block is processed.

    Rows are independent, so a CPU takes them a slab at a time: the slab's scratch stays in cache
    and is reused by the allocator, where block-sized scratch would page-fault fresh memory on
    every call (measured: about 30 ms per 4096 x 4096 block, a few % of the step). A GPU takes
    the whole block at once: its allocator caches blocks and it wants large kernels.
    """
    rows, cols = sim.shape
    slab = max(1, rows if sim.device.type != "cpu" else _CPU_SLAB_ELEMENTS // max(cols, 1))
    for start in range(0, rows, slab):
        yield slice(start, start + slab)


def _shifted_exp(x: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """``out = exp(x - max_j x_ij)`` row by row (``out`` may be ``x``); returns the row maxima and
    the row sums of ``out``, so that ``logsumexp(x) = max + log(sum)`` and ``out / sum`` is the
    softmax, without a second pass."""
    row_max = x.amax(dim=1)
    if out is x:
        out.sub_(row_max[:, None])
    elif out.is_contiguous():
        torch.sub(x, row_max[:, None], out=out)
    else:  # e.g. a block laid out as another's transpose (torch.compile refuses such an out=)
        out.copy_(x).sub_(row_max[:, None])
    out.exp_()
    return row_max, out.sum(dim=1)


def number_of_negatives(cols: int, self_col: Optional[Tensor]) -> int:
    """Negatives per row of a block with ``cols`` candidates (a ``ValueError`` if none)."""
    num_neg = cols - 1 - (0 if self_col is None else 1)
    if num_neg < 1:
        raise ValueError(
            "the (global) batch needs at least 2 samples so that anchors have negatives."
        )
    return num_neg


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
    num_neg = number_of_negatives(sim.shape[1], self_col)
    w = torch.empty_like(sim)
    new_log_u = torch.empty_like(log_u)
    grad_tau = torch.zeros_like(log_u)
    for s_ in _row_slabs(sim):
        rows_slab(
            sim[s_],
            pos_col[s_],
            None if self_col is None else self_col[s_],
            tau[s_],
            log_u[s_],
            gamma,
            rho,
            num_neg,
            need_grad_tau,
            w[s_],
            new_log_u[s_],
            grad_tau[s_],
        )
    objective = tau * (new_log_u + rho)
    return GCLRows(w, new_log_u, grad_tau, objective, num_neg)


def rows_slab(
    sim: Tensor,
    pos_col: Tensor,
    self_col: Optional[Tensor],
    tau: Tensor,
    log_u: Tensor,
    gamma: float,
    rho: float,
    num_neg: int,
    need_grad_tau: bool,
    w: Tensor,
    new_log_u: Tensor,
    grad_tau: Tensor,
) -> None:
    """:func:`global_contrastive_rows` for a slab of rows, written into ``w``, ``new_log_u`` and
    ``grad_tau`` (views of the caller's outputs). One scratch block (``d``) of the slab's size."""
    arange = torch.arange(sim.shape[0], device=sim.device)
    d = scaled_differences(sim, pos_col, self_col, tau, arange)

    # log g = log mean_z exp(d), with w = exp(d - max) kept for the weights below.
    row_max, total = _shifted_exp(d, out=w)
    log_g = row_max + total.log() - math.log(num_neg)
    new_log_u.copy_(moving_average_log(log_u, log_g, gamma))

    # w = exp(d - log u) = exp(d - max) * exp(max - log u); w <= num_neg / gamma whatever tau is.
    w.mul_((row_max - new_log_u).exp_()[:, None])
    sum_w = w.sum(dim=1)
    if need_grad_tau:
        # w * log(w) = w * (d - log u), in place in the scratch block. Elementwise products
        # and sums stay in float32 under autocast (a matmul-based einsum would run in bfloat16:
        # a temperature gradient off by 0.4 at tau 0.005).
        mean_w_log_w = d.sub_(new_log_u[:, None]).mul_(w).sum(dim=1) / num_neg
        grad_tau.copy_(temperature_gradient(new_log_u, sum_w, mean_w_log_w, rho, num_neg))
    # The positive's coefficient: d/d sim_ip of sum_z w_iz (sim_iz - sim_ip) is -sum_z w_iz.
    w[arange, pos_col] = -sum_w


def scaled_differences(
    sim: Tensor,
    pos_col: Tensor,
    self_col: Optional[Tensor],
    tau: Tensor,
    arange: Tensor,
    out: Optional[Tensor] = None,
) -> Tensor:
    """``d = (sim - sim_pos) / tau`` row by row, with the positive's and the anchor's own column
    set so that ``exp(d)`` is exactly 0 there (into ``out`` if given)."""
    pos_sim = sim[arange, pos_col]
    inv_tau = tau.reciprocal()
    d = torch.addcmul((-pos_sim * inv_tau)[:, None], sim, inv_tau[:, None], out=out)
    d[arange, pos_col] = _EXCLUDED
    if self_col is not None:
        d[arange, self_col] = _EXCLUDED
    return d


def moving_average_log(log_u: Tensor, log_g: Tensor, gamma: float) -> Tensor:
    """``log((1 - gamma) * u + gamma * g)`` from ``log(u)`` and ``log(g)``, with gamma 1 where
    ``log_u`` is ``-inf`` (a sample never seen; the first term is then -inf)."""
    first_visit = torch.isneginf(log_u)
    gamma_row = torch.where(first_visit, torch.ones_like(log_u), torch.full_like(log_u, gamma))
    return torch.logaddexp(torch.log1p(-gamma_row) + log_u, torch.log(gamma_row) + log_g)


def temperature_gradient(
    log_u: Tensor, sum_w: Tensor, mean_w_log_w: Tensor, rho: float, num_neg: int
) -> Tensor:
    """``log(u) + rho - mean_z w_z * d_z`` written as ``rho + log(u) * (1 - mean w) - mean(w *
    log w)``: at tau 0.005 log(u) and mean(w * d) are both near 400, and their float32
    difference would lose about 1e-3 of a gradient of order 1."""
    return rho + log_u * (1.0 - sum_w / num_neg) - mean_w_log_w


def row_coefficients(
    sim: Tensor,
    pos_col: Tensor,
    self_col: Optional[Tensor],
    tau: Tensor,
    log_u: Tensor,
    out: Tensor,
) -> None:
    """The surrogate coefficients of rows whose new ``log(u)`` is known, into ``out``:
    ``w_iz = exp(d_iz - log u_i)`` (at most ``num_neg / gamma``, so no overflow) at negatives,
    ``-sum_z w_iz`` at the positive (as :func:`rows_slab` computes them with ``log u``)."""
    arange = torch.arange(sim.shape[0], device=sim.device)
    scaled_differences(sim, pos_col, self_col, tau, arange, out=out)
    out.sub_(log_u[:, None]).exp_()
    out[arange, pos_col] = -out.sum(dim=1)


@dataclass
class DySTreSSRows:
    """Result of :func:`dystress_rows` (all detached).

    Attributes:
        coef: (rows, cols) gradient of each row's cross-entropy with respect to ``sim``:
            ``(softmax_ij - [j = pos_i]) / tau_ij``, 0 at the excluded column (None from the
            tiled path).
        loss: (rows,) cross-entropy of each row.
        tau_positive: (rows,) temperature of each row's positive pair.
        tau_negative_sum: (rows,) sum of the temperatures of each row's negative pairs.
        num_negatives: the number of negatives per row.
    """

    coef: Optional[Tensor]
    loss: Tensor
    tau_positive: Tensor
    tau_negative_sum: Tensor
    num_negatives: int


@torch.no_grad()
def dystress_rows(
    sim: Tensor, pos_col: Tensor, self_col: Optional[Tensor], tau_min: float, tau_max: float
) -> DySTreSSRows:
    """Cross-entropy of ``sim / tau(sim)`` per row, with the positive as label, and its gradient.

    ``tau`` is :func:`dystress_temperature` of each pair (detached), ``self_col`` (if given) is
    left out of the softmax. The gradient is computed here, a slab of rows at a time as in
    :func:`global_contrastive_rows`, so that autograd keeps one (rows, cols) block (``coef``)
    instead of the temperatures and the log-softmax.
    """
    rows, cols = sim.shape
    num_neg = cols - 1 - (0 if self_col is None else 1)
    coef = torch.empty_like(sim)
    loss = torch.empty(rows, dtype=sim.dtype, device=sim.device)
    tau_pos = torch.empty_like(loss)
    tau_neg_sum = torch.empty_like(loss)
    for s_ in _row_slabs(sim):
        loss[s_], tau_pos[s_], tau_neg_sum[s_] = dystress_slab(
            sim[s_],
            pos_col[s_],
            None if self_col is None else self_col[s_],
            tau_min,
            tau_max,
            coef[s_],
        )
    return DySTreSSRows(coef, loss, tau_pos, tau_neg_sum, num_neg)


def dystress_slab(
    sim: Tensor,
    pos_col: Tensor,
    self_col: Optional[Tensor],
    tau_min: float,
    tau_max: float,
    out: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`dystress_rows` for a slab of rows: the coefficients into ``out`` (the slab's view of
    the caller's block, or a scratch tile), and the rows' loss, positive temperature and sum of
    negative temperatures."""
    arange = torch.arange(sim.shape[0], device=sim.device)
    tau = dystress_temperature(sim, tau_min, tau_max)
    tau_pos = tau[arange, pos_col]
    excluded = tau_pos + (0 if self_col is None else tau[arange, self_col])
    tau_neg_sum = tau.sum(dim=1) - excluded
    if out.is_contiguous():
        torch.div(sim, tau, out=out)  # the logits
    else:  # a transposed layout (torch.compile refuses a non-contiguous out=)
        out.copy_(sim).div_(tau)
    logit_pos = out[arange, pos_col]
    if self_col is not None:
        out[arange, self_col] = -math.inf
    row_max, total = _shifted_exp(out, out=out)
    loss = row_max + total.log() - logit_pos
    # d CE / d sim_ij = (softmax_ij - [j = pos_i]) / tau_ij
    out.div_(total[:, None])
    out[arange, pos_col] -= 1.0
    out.div_(tau)
    return loss, tau_pos, tau_neg_sum


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

    Autograd's own ``(coef * sim).sum()`` would keep a (rows, cols) product; this keeps nothing
    but ``coef``, and the backward pass scales ``coef`` in place into the gradient instead of
    allocating another block. ``coef`` is therefore spent by the first backward pass: a second one
    through the same graph (``retain_graph=True``) raises instead of returning a wrong gradient.
    """

    @staticmethod
    def forward(ctx, sim: Tensor, coef: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(coef)
        ctx.spent = False
        return torch.dot(sim.reshape(-1), coef.reshape(-1))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        if ctx.spent:
            raise RuntimeError(
                "backward ran twice through the same contrastive loss graph; its surrogate "
                "coefficients are used up by the first backward pass. Compute the loss again."
            )
        ctx.spent = True
        (coef,) = ctx.saved_tensors
        if torch.compiler.is_compiling():
            # AOT autograd cannot partition a backward that mutates a saved tensor which the
            # forward graph also outputs (pytorch/pytorch#172956), and the compiled graph plans
            # its own buffers anyway.
            return coef * grad, None
        return coef.mul_(grad), None


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
