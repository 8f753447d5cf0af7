"""NumPy loop references of the losses, written from the equations in docs/methods.md.

Everything here is float64 and deliberately naive: explicit loops over anchors and negatives,
``u`` kept as a plain number (not in log space), gradients derived by hand. It shares no code
with ``lightly_tau`` so that agreement between the two means something.

Conventions (as in the losses):

- Unimodal (SimCLR): the batch holds ``B`` samples with two views. The ``2B`` anchors are the
  rows ``[view0; view1]``; anchor ``a`` of sample ``k`` has the other view of ``k`` as positive
  and the other ``2B - 2`` embeddings as negatives. Both views share ``u`` and ``tau``: the new
  ``u`` is the mean of the two views' updated ``u``, the temperature gradient the mean of the two
  views' gradients, and each view's weights use that view's own updated ``u``.
- Image-text (CLIP): image anchor ``k`` has caption ``k`` as positive and the other ``B - 1``
  captions as negatives, text anchors alike against images. Each role has its own state; the
  loss is the mean of the two roles.
- The returned value is the objective estimate ``tau * (log(u) + rho)`` averaged over anchors;
  the gradient is the surrogate's, ``mean_anchors mean_z w_iz * h_iz`` with ``w`` held constant.
- Duplicated indices: every occurrence reads the stored (pre-step) rows and the last occurrence
  in batch order is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

ROLES_UNIMODAL = ("sample",)
ROLES_IMAGE_TEXT = ("image", "text")


@dataclass
class Settings:
    """Hyper-parameters of SogCLR (``learn_tau=False``) or iSogCLR (``learn_tau=True``)."""

    tau_init: float
    gamma: float
    learn_tau: bool = False
    rho: float = 0.0
    eta: float = 0.0
    beta: float = 1.0
    tau_min: float = 0.0
    tau_max: float = math.inf
    grad_clip: float = math.inf


@dataclass
class ReferenceState:
    """Per-sample state of one anchor role: ``u`` in plain space, a visited flag, tau, momentum."""

    num_samples: int
    tau_init: float
    u: np.ndarray = field(init=False)
    visited: np.ndarray = field(init=False)
    tau: np.ndarray = field(init=False)
    momentum: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.u = np.zeros(self.num_samples)
        self.visited = np.zeros(self.num_samples, dtype=bool)
        self.tau = np.full(self.num_samples, self.tau_init)
        self.momentum = np.zeros(self.num_samples)

    def log_u(self) -> np.ndarray:
        """``log(u)`` where visited, ``-inf`` elsewhere (how the losses store it)."""
        out = np.full(self.num_samples, -np.inf)
        out[self.visited] = np.log(self.u[self.visited])
        return out


def new_states(num_samples: int, settings: Settings, roles: Sequence[str]) -> dict:
    return {role: ReferenceState(num_samples, settings.tau_init) for role in roles}


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def input_gradient(x: np.ndarray, grad_e: np.ndarray) -> np.ndarray:
    """Chain rule through ``e = x / |x|``: ``de/dx = (I - e e^T) / |x|``."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    for r in range(x.shape[0]):
        norm = math.sqrt(sum(v * v for v in x[r]))
        e = x[r] / norm
        out[r] = (grad_e[r] - np.dot(grad_e[r], e) * e) / norm
    return out


def anchor_update(h: Sequence[float], tau: float, u_old: float, visited: bool, settings: Settings):
    """One anchor: moving average, weights and temperature gradient (docs/methods.md).

    Returns ``(u, w, grad_tau, objective)``.
    """
    n = len(h)
    g = sum(math.exp(h_z / tau) for h_z in h) / n
    gamma = settings.gamma if visited else 1.0
    u = (1.0 - gamma) * u_old + gamma * g
    w = [math.exp(h_z / tau) / u for h_z in h]
    grad_tau = math.log(u) + settings.rho - sum(w_z * h_z / tau for w_z, h_z in zip(w, h)) / n
    objective = tau * (math.log(u) + settings.rho)
    return u, w, grad_tau, objective


def temperature_update(tau: float, momentum: float, grad: float, settings: Settings):
    grad = min(max(grad, -settings.grad_clip), settings.grad_clip)
    momentum = (1.0 - settings.beta) * momentum + settings.beta * grad
    tau = min(max(tau - settings.eta * momentum, settings.tau_min), settings.tau_max)
    return tau, momentum


def _write(state: ReferenceState, updates: list, settings: Settings) -> None:
    # In batch order, so the last occurrence of a duplicated index is the one that stays.
    for i, u, tau, momentum in updates:
        state.u[i] = u
        state.visited[i] = True
        if settings.learn_tau:
            state.tau[i] = tau
            state.momentum[i] = momentum


def unimodal_step(
    out0: np.ndarray,
    out1: np.ndarray,
    index: Sequence[int],
    states: dict,
    settings: Settings,
    train: bool = True,
) -> tuple[float, np.ndarray, np.ndarray]:
    """SogCLR / iSogCLR on a SimCLR batch; updates ``states["sample"]`` when ``train``.

    Returns the loss value and the gradients of the surrogate with respect to ``out0``, ``out1``.
    """
    state = states["sample"]
    b = len(index)
    e = normalize(np.concatenate([out0, out1]))
    n_rows = 2 * b
    grad_e = np.zeros_like(e)
    value = 0.0
    updates = []
    for k in range(b):
        i = int(index[k])
        tau = state.tau[i] if settings.learn_tau else settings.tau_init
        view_u, view_grad = [], []
        for view in (0, 1):
            a = view * b + k
            p = (1 - view) * b + k
            negatives = [z for z in range(n_rows) if z not in (a, p)]
            h = [e[a] @ e[z] - e[a] @ e[p] for z in negatives]
            u, w, grad_tau, objective = anchor_update(
                h, tau, state.u[i], state.visited[i], settings
            )
            view_u.append(u)
            view_grad.append(grad_tau)
            value += objective / n_rows
            for z, w_z in zip(negatives, w):
                c = w_z / (len(negatives) * n_rows)
                grad_e[a] += c * (e[z] - e[p])
                grad_e[z] += c * e[a]
                grad_e[p] -= c * e[a]
        new_tau, new_m = tau, state.momentum[i]
        if settings.learn_tau:
            new_tau, new_m = temperature_update(
                tau, state.momentum[i], 0.5 * (view_grad[0] + view_grad[1]), settings
            )
        updates.append((i, 0.5 * (view_u[0] + view_u[1]), new_tau, new_m))
    if train:
        _write(state, updates, settings)
    x = np.concatenate([out0, out1]).astype(np.float64)
    grad_x = input_gradient(x, grad_e)
    return value, grad_x[:b], grad_x[b:]


def image_text_step(
    image: np.ndarray,
    text: np.ndarray,
    index: Sequence[int],
    states: dict,
    settings: Settings,
    train: bool = True,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Image-text SogCLR / iSogCLR; updates ``states["image"]`` and ``states["text"]``.

    The positive pair is not among the negatives. Returns the loss value (mean of the two
    roles) and the surrogate's gradients with respect to ``image`` and ``text``.
    """
    b = len(index)
    e_img, e_txt = normalize(image), normalize(text)
    grads = {"image": np.zeros_like(e_img), "text": np.zeros_like(e_txt)}
    value = 0.0
    all_updates = {}
    for role, anchors, candidates, other in (
        ("image", e_img, e_txt, "text"),
        ("text", e_txt, e_img, "image"),
    ):
        state = states[role]
        updates = []
        for k in range(b):
            i = int(index[k])
            tau = state.tau[i] if settings.learn_tau else settings.tau_init
            negatives = [z for z in range(b) if z != k]
            h = [anchors[k] @ candidates[z] - anchors[k] @ candidates[k] for z in negatives]
            u, w, grad_tau, objective = anchor_update(
                h, tau, state.u[i], state.visited[i], settings
            )
            value += 0.5 * objective / b
            for z, w_z in zip(negatives, w):
                c = w_z / (len(negatives) * b * 2)
                grads[role][k] += c * (candidates[z] - candidates[k])
                grads[other][z] += c * anchors[k]
                grads[other][k] -= c * anchors[k]
            new_tau, new_m = tau, state.momentum[i]
            if settings.learn_tau:
                new_tau, new_m = temperature_update(tau, state.momentum[i], grad_tau, settings)
            updates.append((i, u, new_tau, new_m))
        all_updates[role] = updates
    if train:
        for role, updates in all_updates.items():
            _write(states[role], updates, settings)
    return value, input_gradient(image, grads["image"]), input_gradient(text, grads["text"])


def robust_objective(h: Sequence[float], tau: float, rho: float) -> float:
    """``tau * log(mean_z exp(h_z / tau)) + tau * rho``: the iSogCLR objective of one anchor."""
    return tau * math.log(sum(math.exp(h_z / tau) for h_z in h) / len(h)) + tau * rho


def dystress_tau(s: float, tau_min: float, tau_max: float) -> float:
    """DySTreSS temperature in its cosine form, after clamping the similarity to [-1, 1]."""
    s = min(max(s, -1.0), 1.0)
    return tau_min + 0.5 * (tau_max - tau_min) * (1.0 + math.cos(math.pi * (1.0 + s)))


def _cross_entropy_rows(
    anchors: np.ndarray,
    candidates: np.ndarray,
    rows: Sequence[tuple[int, int, list[int]]],
    tau_min: float,
    tau_max: float,
    scale: float,
    grad_anchors: np.ndarray,
    grad_candidates: np.ndarray,
) -> float:
    """Sum over ``rows`` of ``scale * CE(s / tau(s))``; adds the gradients (tau held constant).

    Each row is ``(anchor, positive, candidate columns)``.
    """
    total = 0.0
    for a, p, columns in rows:
        s = [anchors[a] @ candidates[z] for z in columns]
        taus = [dystress_tau(s_z, tau_min, tau_max) for s_z in s]
        logits = [s_z / t for s_z, t in zip(s, taus)]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        norm = sum(exps)
        p_pos = columns.index(p)
        total += scale * (top + math.log(norm) - logits[p_pos])
        for j, z in enumerate(columns):
            dlogit = scale * (exps[j] / norm - (1.0 if j == p_pos else 0.0))
            ds = dlogit / taus[j]
            grad_anchors[a] += ds * candidates[z]
            grad_candidates[z] += ds * anchors[a]
    return total


def dystress_unimodal(
    out0: np.ndarray, out1: np.ndarray, tau_min: float, tau_max: float
) -> tuple[float, np.ndarray, np.ndarray]:
    """NT-Xent with DySTreSS temperatures: each of the 2B anchors against the 2B - 1 others."""
    b = out0.shape[0]
    e = normalize(np.concatenate([out0, out1]))
    grad_e = np.zeros_like(e)
    rows = [(a, (a + b) % (2 * b), [z for z in range(2 * b) if z != a]) for a in range(2 * b)]
    value = _cross_entropy_rows(e, e, rows, tau_min, tau_max, 1.0 / (2 * b), grad_e, grad_e)
    grad_x = input_gradient(np.concatenate([out0, out1]), grad_e)
    return value, grad_x[:b], grad_x[b:]


def dystress_image_text(
    image: np.ndarray, text: np.ndarray, tau_min: float, tau_max: float
) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean of image-to-text and text-to-image cross-entropies with DySTreSS temperatures."""
    b = image.shape[0]
    e_img, e_txt = normalize(image), normalize(text)
    g_img, g_txt = np.zeros_like(e_img), np.zeros_like(e_txt)
    rows = [(k, k, list(range(b))) for k in range(b)]
    scale = 1.0 / (2 * b)
    value = _cross_entropy_rows(e_img, e_txt, rows, tau_min, tau_max, scale, g_img, g_txt)
    value += _cross_entropy_rows(e_txt, e_img, rows, tau_min, tau_max, scale, g_txt, g_img)
    return value, input_gradient(image, g_img), input_gradient(text, g_txt)


# ---------------------------------------------------------------- RGCL-g and TempNet


def _anchor_tau(state: ReferenceState, i: int, settings: Settings) -> float:
    return state.tau[i] if settings.learn_tau else settings.tau_init


def image_text_grad_tau(
    image: np.ndarray, text: np.ndarray, index: Sequence[int], states: dict, settings: Settings
) -> dict[str, np.ndarray]:
    """Each anchor's temperature gradient ``grad_tau_i`` (unclipped), by role; no state change.

    The temperature of anchor ``k`` is ``states[role].tau[index[k]]`` with ``learn_tau``, else
    ``settings.tau_init``; ``u`` is the updated moving average, as in :func:`anchor_update`.
    """
    b = len(index)
    e_img, e_txt = normalize(image), normalize(text)
    out = {}
    for role, anchors, candidates in (("image", e_img, e_txt), ("text", e_txt, e_img)):
        state = states[role]
        grads = np.zeros(b)
        for k in range(b):
            i = int(index[k])
            h = [
                anchors[k] @ candidates[z] - anchors[k] @ candidates[k] for z in range(b) if z != k
            ]
            _, _, grads[k], _ = anchor_update(
                h, _anchor_tau(state, i, settings), state.u[i], state.visited[i], settings
            )
        out[role] = grads
    return out


def unimodal_grad_tau(
    out0: np.ndarray, out1: np.ndarray, index: Sequence[int], states: dict, settings: Settings
) -> np.ndarray:
    """``grad_tau`` of each of the ``2B`` anchor rows ``[view0; view1]``; no state change."""
    state = states["sample"]
    b = len(index)
    e = normalize(np.concatenate([out0, out1]))
    grads = np.zeros(2 * b)
    for k in range(b):
        i = int(index[k])
        for view in (0, 1):
            a, p = view * b + k, (1 - view) * b + k
            h = [e[a] @ e[z] - e[a] @ e[p] for z in range(2 * b) if z not in (a, p)]
            _, _, grads[a], _ = anchor_update(
                h, _anchor_tau(state, i, settings), state.u[i], state.visited[i], settings
            )
    return grads


def rgclg_objective_image_text(
    image: np.ndarray, text: np.ndarray, tau: float, rho: float
) -> float:
    """FastCLIP-v3's objective on one batch with the batch as the whole dataset, halved:
    ``1/2 * mean_i [robust_i(image anchor) + robust_i(text anchor)]`` (docs/methods.md, F / 2)."""
    b = image.shape[0]
    e_img, e_txt = normalize(image), normalize(text)
    total = 0.0
    for anchors, candidates in ((e_img, e_txt), (e_txt, e_img)):
        for k in range(b):
            h = [
                anchors[k] @ candidates[z] - anchors[k] @ candidates[k] for z in range(b) if z != k
            ]
            total += robust_objective(h, tau, rho) / (2 * b)
    return total


def rgclg_objective_unimodal(out0: np.ndarray, out1: np.ndarray, tau: float, rho: float) -> float:
    """The unimodal RGCL-g objective on one batch: mean over the ``2B`` anchors."""
    b = out0.shape[0]
    e = normalize(np.concatenate([out0, out1]))
    total = 0.0
    for a in range(2 * b):
        p = (a + b) % (2 * b)
        h = [e[a] @ e[z] - e[a] @ e[p] for z in range(2 * b) if z not in (a, p)]
        total += robust_objective(h, tau, rho) / (2 * b)
    return total


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def tempnet_forward(z: np.ndarray, params: dict, tau_min: float, tau_max: float) -> np.ndarray:
    """TempNet's generator without dropout, from its equations (docs/methods.md), in float64.

    ``params``: ``proj.weight`` (d, d), ``proj.bias`` (d,), ``prototypes`` (M, d), ``log_scale``,
    ``head.weight`` (1, M), ``head.bias`` (1,).
    """
    z = np.asarray(z, dtype=np.float64)
    x = _sigmoid(z @ params["proj.weight"].T + params["proj.bias"])
    protos = params["prototypes"] / np.linalg.norm(params["prototypes"], axis=1, keepdims=True)
    prods = x @ protos.T
    m = prods.shape[1]
    scaled = prods / math.exp(float(params["log_scale"]))
    weights = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    t = ((weights - 1.0 / m) * _sigmoid(prods)) @ params["head.weight"][0] + params["head.bias"][0]
    return tau_min + (tau_max - tau_min) * _sigmoid(t)
