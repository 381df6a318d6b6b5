"""train_one_epoch / EMA on small stand-in models."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from xception.training import engine
from xception.data.images import Batch
from xception.training.engine import ModelEma, NonFiniteLossError, TrainState, train_one_epoch


def _batches(n_batches: int, batch: int = 4, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        x = torch.randn(batch, 3, 8, 8, generator=g)
        y = torch.randint(0, classes, (batch,), generator=g)
        out.append(Batch(x, y, torch.arange(b * batch, (b + 1) * batch), []))
    return out


def _state(model: nn.Module, accum: int = 1) -> TrainState:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return TrainState(model=model, raw_model=model, optimizer=opt, scheduler=sched, device=torch.device("cpu"),
                      accum_steps=accum)


def _net(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, classes))


def test_train_one_epoch_counts_steps_samples_and_learns():
    model = _net()
    state = _state(model)
    data = _batches(5)
    first = train_one_epoch(state, data)
    for _ in range(15):
        last = train_one_epoch(state, data)
    assert state.step == 16 * 5 and state.epoch_step == 16 * 5
    assert first.images == 20 and not first.interrupted
    assert last.train_loss < first.train_loss and last.train_top1 > first.train_top1


def test_gradient_accumulation_steps_and_stop_request():
    state = _state(_net(), accum=2)
    train_one_epoch(state, _batches(5))
    assert state.step == 3  # 2 + 2 + the epoch's last single batch
    state = _state(_net())
    result = train_one_epoch(state, _batches(5), should_stop=lambda: True)
    assert result.interrupted and state.step == 1 and state.epoch_samples == 4


def test_non_finite_loss_stops_before_the_step(monkeypatch):
    model = _net()
    state = _state(model)
    calls = {"n": 0}
    cross_entropy = engine.F.cross_entropy

    def nan_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        loss = cross_entropy(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(engine, "F", types.SimpleNamespace(cross_entropy=nan_on_third_batch))
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        train_one_epoch(state, _batches(5))
    assert state.step == 2  # steps 1 and 2 done, the poisoned third never applied
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ema_follows_weights_with_warmup_decay():
    model = nn.Linear(2, 1)
    ema = ModelEma(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.module.weight.fill_(0.0)
    ema.update(model, step=100)  # decay = min(0.5, 101/110) = 0.5
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.5))
    ema.update(model, step=0)  # decay = 1/10: nearly a copy
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.5 * 0.1 + 0.9))
    assert not ema.module.weight.requires_grad
