"""The LR schedules follow their formulas (warmup + cosine, WSD, constant)."""

import math

import pytest
import torch

from megafusion.config import load_config
from megafusion.training.optim import build_scheduler


def _lrs(overrides, steps=20):
    cfg = load_config(None, [f"train.steps={steps}", "optimizer.lr=1.0", "optimizer.min_lr=0.1", *overrides])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(cfg, optimizer)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=1)
    return out


def test_warmup_then_cosine():
    lrs = _lrs(["schedule.kind=cosine", "schedule.warmup_steps=4"])
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    for step in range(4, 20):
        progress = (step - 4) / 16
        assert lrs[step] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def test_wsd_is_flat_then_decays_in_last_fraction():
    lrs = _lrs(["schedule.kind=wsd", "schedule.warmup_steps=2", "schedule.wsd_decay_fraction=0.25"])
    assert lrs[2:15] == pytest.approx([1.0] * 13)  # stable until 20 - 5 decay steps
    assert all(a > b for a, b in zip(lrs[15:], lrs[16:]))
    assert lrs[-1] > 0.1 - 1e-9


def test_constant():
    assert _lrs(["schedule.kind=constant"]) == pytest.approx([1.0] * 20)
