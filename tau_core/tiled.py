"""Tiled blocks: the losses' similarity block a tile of anchor rows at a time.

Every loss of this package is row-separable: an anchor's moving average, surrogate coefficients,
temperature gradient and objective need only that anchor's row of the similarity block (SogCLR's
coefficient of pair (i, j) is ``exp((s_ij - s_ii) / tau_i) / u_i`` with the row's new ``u_i``;
DySTreSS's temperature is a function of each pair's own similarity). So a tile of ``chunk_size``
anchor rows against all candidates holds everything its rows need, and the per-row math is the
untiled path's own (:func:`tau_core.functional.rows_slab`, :func:`tau_core.functional.dystress_slab`).

The surrogate ``sum(coef * sim)`` is linear in ``sim`` with constant ``coef``, so its gradient
with respect to the features is known as soon as a tile's coefficients are:
``d/dA[r] = coef_r @ C`` and ``d/dC += coef_r.T @ A[r]`` for anchors ``A`` and candidates ``C``.
Both are accumulated in the same pass as the forward (three matrix products per tile, as many as
the untiled forward and backward together), and the backward of :class:`_PrecomputedGradient`
only scales them by the incoming gradient. Between forward and backward nothing of size
(rows, cols) is kept: the memory is O((rows + cols) * dim + chunk_size * cols).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from tau_core.functional import (
    _EXCLUDED,
    DySTreSSRows,
    GCLRows,
    dystress_slab,
    moving_average_log,
    number_of_negatives,
    row_coefficients,
    rows_slab,
    temperature_gradient,
)


def check_chunk_size(chunk_size: int) -> int:
    """``chunk_size`` as an int >= 0 (0: one untiled block), else a ``ValueError`` naming it."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(
            "chunk_size must be an integer >= 0 (anchor rows per tile of the similarity block; "
            f"0 computes the whole block at once), got {chunk_size!r}."
        )
    return chunk_size


def _tiles(rows: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, rows, chunk_size):
        yield slice(start, min(start + chunk_size, rows))


class _PrecomputedGradient(torch.autograd.Function):
    """A scalar ``value`` whose gradients with respect to ``anchors`` and ``candidates`` were
    computed with it (the tiled surrogate's); backward scales them by the incoming gradient, in
    place, so a second backward pass through the same graph raises (as the untiled one does)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        anchors: Tensor,
        candidates: Tensor,
        value: Tensor,
        grad_anchors: Optional[Tensor],
        grad_candidates: Optional[Tensor],
    ) -> Tensor:
        ctx.grads = (grad_anchors, grad_candidates)
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError(
                "backward ran twice through the same contrastive loss graph; its gradients are "
                "used up by the first backward pass. Compute the loss again."
            )
        grad_anchors, grad_candidates = ctx.grads
        ctx.grads = None
        if grad_anchors is None:
            return None, None, None, None, None
        # Scaled in place: no second copy of the (rows + cols) x dim gradients.
        return grad_anchors.mul_(grad), grad_candidates.mul_(grad), None, None, None


TileFunction = Callable[[slice, Tensor, Tensor], None]


def tiled_weighted_sum(
    anchors: Tensor, candidates: Tensor, chunk_size: int, tile: TileFunction
) -> Tensor:
    """``sum(coef * (anchors @ candidates.T))`` tile by tile, with its gradient to both inputs.

    ``tile(rows, sim, coef)`` receives the slice of anchor rows, their float32 similarity tile
    (not to be changed) and a scratch tile of the same shape to fill with the rows' surrogate
    coefficients (and records the rows' other results itself). The gradients are computed only
    when autograd will want them (grad mode on and an input that requires grad).
    """
    need_grad = torch.is_grad_enabled() and (anchors.requires_grad or candidates.requires_grad)
    rows, cols = anchors.shape[0], candidates.shape[0]
    with torch.no_grad(), torch.autocast(device_type=anchors.device.type, enabled=False):
        a, c = anchors.detach().float(), candidates.detach().float()
        grad_a = torch.empty_like(a) if need_grad else None
        grad_c = torch.zeros_like(c) if need_grad else None
        value = a.new_zeros(())
        sim_buffer = a.new_empty(min(chunk_size, rows), cols)
        coef_buffer = torch.empty_like(sim_buffer)
        for r in _tiles(rows, chunk_size):
            n = r.stop - r.start
            sim, coef = sim_buffer[:n], coef_buffer[:n]
            torch.mm(a[r], c.T, out=sim)
            tile(r, sim, coef)
            value += torch.dot(sim.reshape(-1), coef.reshape(-1))
            if need_grad:
                torch.mm(coef, c, out=grad_a[r])
                grad_c.addmm_(coef.T, a[r])
    if need_grad:
        grad_a, grad_c = grad_a.to(anchors.dtype), grad_c.to(candidates.dtype)
    return _PrecomputedGradient.apply(anchors, candidates, value, grad_a, grad_c)


def tiled_global_contrastive(
    anchors: Tensor,
    candidates: Tensor,
    pos_col: Tensor,
    self_col: Optional[Tensor],
    tau: Tensor,
    log_u: Tensor,
    gamma: float,
    rho: float,
    need_grad_tau: bool,
    chunk_size: int,
) -> tuple[Tensor, GCLRows]:
    """:func:`tau_core.functional.global_contrastive_rows` of ``anchors @ candidates.T``, tiled.

    Returns the surrogate ``sum(coef * sim)`` (with its gradient to ``anchors`` and
    ``candidates``) and the rows' results (``coef`` None: it is never held whole).
    """
    num_neg = number_of_negatives(candidates.shape[0], self_col)
    tau, log_u = tau.detach().float(), log_u.float()
    new_log_u = torch.empty_like(log_u)
    grad_tau = torch.zeros_like(log_u)

    def tile(r: slice, sim: Tensor, coef: Tensor) -> None:
        self_r = None if self_col is None else self_col[r]
        rows_slab(
            sim, pos_col[r], self_r, tau[r], log_u[r], gamma, rho, num_neg, need_grad_tau,
            coef, new_log_u[r], grad_tau[r],
        )  # fmt: skip

    surrogate = tiled_weighted_sum(anchors, candidates, chunk_size, tile)
    objective = tau * (new_log_u + rho)
    return surrogate, GCLRows(None, new_log_u, grad_tau, objective, num_neg)


def tiled_dystress(
    anchors: Tensor,
    candidates: Tensor,
    pos_col: Tensor,
    self_col: Optional[Tensor],
    tau_min: float,
    tau_max: float,
    chunk_size: int,
) -> tuple[Tensor, DySTreSSRows]:
    """:func:`tau_core.functional.dystress_rows` of ``anchors @ candidates.T``, tiled.

    Returns the surrogate ``sum(coef * sim)`` (its gradient is the cross-entropy's) and the rows'
    results (``coef`` None).
    """
    rows = anchors.shape[0]
    num_neg = candidates.shape[0] - 1 - (0 if self_col is None else 1)
    loss = anchors.new_empty(rows, dtype=torch.float32)
    tau_pos, tau_neg_sum = torch.empty_like(loss), torch.empty_like(loss)

    def tile(r: slice, sim: Tensor, coef: Tensor) -> None:
        self_r = None if self_col is None else self_col[r]
        loss[r], tau_pos[r], tau_neg_sum[r] = dystress_slab(
            sim, pos_col[r], self_r, tau_min, tau_max, coef
        )

    surrogate = tiled_weighted_sum(anchors, candidates, chunk_size, tile)
    return surrogate, DySTreSSRows(None, loss, tau_pos, tau_neg_sum, num_neg)


def tiled_global_contrastive_blocks(
    blocks: Sequence[Any], block_args: Sequence[tuple], chunk_size: int
) -> tuple[Tensor, list[GCLRows]]:
    """The tiled step of a loss's blocks (:class:`tau_core.adapter.AnchorBlock` with ``sim`` None).

    ``block_args[k]`` are block ``k``'s arguments of :func:`global_contrastive_rows` after
    ``sim``. Returns the surrogate, each block's term divided by its scale (negatives times rows
    times blocks), and each block's rows. A block that is the transpose of another (image-text in
    one process) is computed with it, from the same tiles (:func:`tiled_global_contrastive_pair`).
    """
    surrogate: Optional[Tensor] = None
    results: list[Optional[GCLRows]] = [None] * len(blocks)
    for position, block in enumerate(blocks):
        if block.transpose_of is not None:
            continue
        partner = next((k for k, b in enumerate(blocks) if b.transpose_of == position), None)
        if partner is None:
            term, results[position] = tiled_global_contrastive(
                block.anchors, block.candidates, *block_args[position], chunk_size
            )
        else:
            term, results[position], results[partner] = tiled_global_contrastive_pair(
                block.anchors, block.candidates, block_args[position], block_args[partner],
                chunk_size,
            )  # fmt: skip
        scale = results[position].num_negatives * block.anchors.shape[0] * len(blocks)
        surrogate = term / scale if surrogate is None else surrogate + term / scale
    return surrogate, results  # type: ignore[return-value]


def _column_statistics(
    d: Tensor, excluded: tuple[Tensor, Tensor], stats: list[Tensor], need_entropy: bool
) -> None:
    """Adds a tile's rows to running column statistics of ``exp(d)`` (``d`` is overwritten):
    ``stats = [m, s, t]`` with ``m`` the column maxima so far, ``s = sum exp(d - m)`` and
    ``t = sum exp(d - m) * (d - m)``, rescaled whenever ``m`` grows (an online log-sum-exp)."""
    col_max, col_sum, col_ent = stats
    d[excluded] = _EXCLUDED
    new_max = torch.maximum(col_max, d.amax(dim=0))
    rescale = (col_max - new_max).exp_()
    x = d.sub_(new_max)
    e = torch.exp(x)
    e[excluded] = 0.0  # a column with nothing but its excluded entry so far has x = 0 there
    if need_entropy:
        col_ent.add_((col_max - new_max) * col_sum).mul_(rescale).add_((e * x).sum(dim=0))
    col_sum.mul_(rescale).add_(e.sum(dim=0))
    col_max.copy_(new_max)


def tiled_global_contrastive_pair(
    anchors: Tensor,
    candidates: Tensor,
    args: tuple,
    transposed_args: tuple,
    chunk_size: int,
) -> tuple[Tensor, GCLRows, GCLRows]:
    """The step of a block ``S = anchors @ candidates.T`` and of its transpose, from S's row tiles.

    ``args``, ``transposed_args``: each block's arguments of :func:`global_contrastive_rows`
    after ``sim`` (positives on the diagonal, no excluded own column). The block's rows are
    :func:`tiled_global_contrastive`'s; the transpose's rows are S's columns, whose statistics
    (log-sum-exp and, for the temperature gradient, ``sum softmax * log softmax``) accumulate
    online over the row tiles. The first pass gives both roles' new ``log(u)``; the second
    recomputes each tile and both roles' coefficients, summed into one tile, so the surrogate
    costs four matrix products per tile row where two independent blocks would cost six.
    Returns the surrogate ``sum(coef * S) + sum(coef_t * S.T)`` and the two roles' rows.
    """
    pos_col, self_col, tau, log_u, gamma, rho, need_grad_tau = args
    t_pos, t_self, tau_t, log_u_t, _, _, _ = transposed_args
    if self_col is not None or t_self is not None:
        raise ValueError("a transposed pair of blocks has no excluded own column")
    rows = anchors.shape[0]
    num_neg = number_of_negatives(rows, None)
    tau, log_u = tau.detach().float(), log_u.float()
    inv_tau_t, log_u_t = tau_t.detach().float().reciprocal(), log_u_t.float()
    new_log_u, grad_tau = torch.empty_like(log_u), torch.zeros_like(log_u)
    row_args = (pos_col, tau, log_u, gamma, rho, num_neg, need_grad_tau)
    diag, stats = _first_pass(
        anchors, candidates, row_args, t_pos, inv_tau_t, chunk_size, new_log_u, grad_tau
    )
    with torch.no_grad(), torch.autocast(device_type=anchors.device.type, enabled=False):
        new_log_u_t, sum_w_t, grad_tau_t = _column_rows(
            stats, log_u_t, gamma, rho, num_neg, need_grad_tau
        )
    scratch = diag.new_empty(min(chunk_size, rows), rows)

    def tile(r: slice, sim: Tensor, coef: Tensor) -> None:
        d = scratch[: r.stop - r.start]
        row_coefficients(sim, pos_col[r], None, tau[r], new_log_u[r], out=coef)
        # The transpose's coefficients at (i, j): exp(d_ij - log u_j), -sum_i w_ij at i = j.
        local = torch.arange(r.stop - r.start, device=sim.device)
        torch.sub(sim, diag, out=d).mul_(inv_tau_t).sub_(new_log_u_t).exp_()
        d[local, t_pos[r]] = -sum_w_t[r]
        coef.add_(d)

    surrogate = tiled_weighted_sum(anchors, candidates, chunk_size, tile)
    objective = tau * (new_log_u + rho)
    objective_t = tau_t.detach().float() * (new_log_u_t + rho)
    return (
        surrogate,
        GCLRows(None, new_log_u, grad_tau, objective, num_neg),
        GCLRows(None, new_log_u_t, grad_tau_t, objective_t, num_neg),
    )


def _first_pass(
    anchors: Tensor,
    candidates: Tensor,
    row_args: tuple,
    t_pos: Tensor,
    inv_tau_t: Tensor,
    chunk_size: int,
    new_log_u: Tensor,
    grad_tau: Tensor,
) -> tuple[Tensor, list[Tensor]]:
    """The first pass of :func:`tiled_global_contrastive_pair`: the rows' new ``log(u)`` and
    temperature gradient (written into ``new_log_u``, ``grad_tau``), the positives' similarities
    ``S_jj`` and the columns' running statistics (:func:`_column_statistics`)."""
    pos_col, tau, log_u, gamma, rho, num_neg, need_grad_tau = row_args
    rows = anchors.shape[0]
    with torch.no_grad(), torch.autocast(device_type=anchors.device.type, enabled=False):
        a, c = anchors.detach().float(), candidates.detach().float()
        # The positives' similarities S_jj (the columns' positives), as in the matrix product.
        diag = torch.einsum("ij,ij->i", a, c)
        sim_buffer = a.new_empty(min(chunk_size, rows), rows)
        coef_buffer, scratch = torch.empty_like(sim_buffer), torch.empty_like(sim_buffer)
        stats = [torch.full_like(diag, _EXCLUDED), torch.zeros_like(diag), torch.zeros_like(diag)]
        for r in _tiles(rows, chunk_size):
            sim, coef, d = (x[: r.stop - r.start] for x in (sim_buffer, coef_buffer, scratch))
            torch.mm(a[r], c.T, out=sim)
            rows_slab(
                sim, pos_col[r], None, tau[r], log_u[r], gamma, rho, num_neg, need_grad_tau,
                coef, new_log_u[r], grad_tau[r],
            )  # fmt: skip
            local = torch.arange(r.stop - r.start, device=a.device)
            excluded = (local, t_pos[r])
            torch.sub(sim, diag, out=d).mul_(inv_tau_t)
            _column_statistics(d, excluded, stats, need_grad_tau)
    return diag, stats


def _column_rows(
    stats: list[Tensor],
    log_u_t: Tensor,
    gamma: float,
    rho: float,
    num_neg: int,
    need_grad_tau: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The transposed role's new ``log(u)``, sum of weights and temperature gradient, from the
    columns' statistics ``[max, sum exp(d - max), sum exp(d - max) * (d - max)]``."""
    col_max, col_sum, col_ent = stats
    log_total = col_max + col_sum.log()
    new_log_u_t = moving_average_log(log_u_t, log_total - math.log(num_neg), gamma)
    sum_w_t = (log_total - new_log_u_t).exp()
    grad_tau_t = torch.zeros_like(log_u_t)
    if need_grad_tau:
        shift = col_max - new_log_u_t
        mean_w_log_w = shift.exp() * (col_ent + shift * col_sum) / num_neg
        grad_tau_t = temperature_gradient(new_log_u_t, sum_w_t, mean_w_log_w, rho, num_neg)
    return new_log_u_t, sum_w_t, grad_tau_t
