"""TrainedTemperature in Lightning: the model keeps its SGD (even one over self.parameters()),
the temperature moves by its own AdamW exactly as a float64 reference, and a Lightning run
without the callback warns that the temperature is stepped by the wrong optimizer."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightly_tau import RGCLGLoss, SogCLRLoss, TempNetLoss, TrainedTemperature
from tests.test_trained_temperature import adamw_reference

N, B, IN, DIM = 48, 12, 10, 16
STEPS_MESSAGE = "not stepped by their own optimizer"


class Pairs(torch.utils.data.Dataset):
    """Two noisy views of fixed points, and the index."""

    def __init__(self) -> None:
        self.x = torch.randn(N, IN, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> Any:
        g = torch.Generator().manual_seed(1000 + i)
        x = self.x[i]
        return (x + 0.1 * torch.randn(IN, generator=g), x + 0.1 * torch.randn(IN, generator=g)), i


class Module(pl.LightningModule):
    def __init__(self, criterion: nn.Module) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(IN, 32), nn.ReLU(), nn.Linear(32, DIM))
        self.criterion = criterion
        self.grads: list[list[torch.Tensor]] = []
        for p in getattr(criterion, "temperature_parameters", list)():
            p.register_hook(self._record)
        self._pending: list[torch.Tensor] = []

    def _record(self, grad: torch.Tensor) -> None:
        self._pending.append(grad.detach().double().clone())
        if len(self._pending) == len(self.criterion.temperature_parameters()):
            self.grads.append(self._pending)  # one step's gradients, in the order autograd gave
            self._pending = []

    def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
        (x0, x1), index = batch
        return self.criterion(self.model(x0), self.model(x1), index)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.06, momentum=0.9)  # holds the loss's too


def fit(module: Module, callbacks: list[pl.Callback], epochs: int = 2) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    loader = torch.utils.data.DataLoader(Pairs(), batch_size=B, shuffle=True, drop_last=True)
    trainer.fit(module, loader)
    return trainer


def test_rgclg_moves_by_its_own_adamw_exactly_and_sgd_skips_it():
    criterion = RGCLGLoss(N, lr_tau=1e-2)
    module = Module(criterion)
    start = [criterion.logit_scale.detach().clone()]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = fit(module, [TrainedTemperature()])
    assert not [w for w in record if STEPS_MESSAGE in str(w.message)]
    steps = 2 * (N // B)
    assert len(module.grads) == steps
    bounds = (math.log(1 / criterion.global_temperature.tau_max), math.log(1 / 0.05))
    expected = adamw_reference(start, module.grads, 1e-2, bounds)
    torch.testing.assert_close(
        criterion.logit_scale.detach().double(), expected[0], rtol=1e-6, atol=1e-7
    )
    assert abs(criterion.temperature - 0.1) > 1e-3  # it moved, by AdamW's steps of lr 1e-2
    sgd = trainer.optimizers[0]
    assert criterion.logit_scale not in sgd.state  # the SGD never stepped it
    assert all(p in sgd.state for p in module.model.parameters())


def test_tempnet_networks_move_by_their_own_adamw_and_set_epoch_follows():
    criterion = TempNetLoss(N, dim=DIM, lr_tau=1e-3, num_prototypes=8, dropout=0.0)
    module = Module(criterion)
    params = criterion.temperature_parameters()
    start = [p.detach().clone() for p in params]
    callback = TrainedTemperature()
    fit(module, [callback], epochs=1)
    assert criterion.epoch == 0
    # reverse-mode hooks fire last-used first: match each gradient to its parameter by shape
    ordered = []
    for step in module.grads:
        pool = list(step)
        row = []
        for p in params:
            k = next(k for k, g in enumerate(pool) if g.shape == p.shape)
            row.append(pool.pop(k))
        ordered.append(row)
    assert len({p.shape for p in params}) == len(params)  # shapes tell the parameters apart
    expected = adamw_reference(start, ordered, 1e-3)
    for p, ref in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(p.detach(), s) for p, s in zip(params, start))
    state = callback.state_dict()["optimizers"]["criterion"]
    assert len(state["state"]) == len(params)


def test_without_the_callback_the_models_sgd_steps_the_temperature_and_it_warns():
    criterion = RGCLGLoss(N)
    with pytest.warns(UserWarning, match=STEPS_MESSAGE + ".*changed by another optimizer"):
        fit(Module(criterion), [], epochs=2)


def test_the_callback_needs_a_trained_temperature():
    with pytest.raises(ValueError, match="no loss with a trained temperature"):
        fit(Module(SogCLRLoss(N)), [TrainedTemperature()], epochs=1)
