import math

import pytest
import torch
from torch import nn

from mrcnn_fast.config import get_config, merge
from mrcnn_fast.engine.solver import LRSchedule, build_optimizer, lr_factor, param_groups


def test_step_schedule_with_warmup_matches_hand_values():
    kw = dict(max_iter=100, schedule="step", steps=(60, 80), gamma=0.1, warmup_iters=10, warmup_factor=0.001)
    assert lr_factor(0, **kw) == pytest.approx(0.001)
    assert lr_factor(5, **kw) == pytest.approx(0.001 * 0.5 + 0.5)        # alpha = 5/10
    assert lr_factor(9, **kw) == pytest.approx(0.001 * 0.1 + 0.9)
    assert lr_factor(10, **kw) == 1.0
    assert lr_factor(59, **kw) == 1.0
    assert lr_factor(60, **kw) == pytest.approx(0.1)
    assert lr_factor(79, **kw) == pytest.approx(0.1)
    assert lr_factor(80, **kw) == pytest.approx(0.01)
    assert lr_factor(99, **kw) == pytest.approx(0.01)


def test_cosine_schedule_with_warmup_matches_hand_values():
    kw = dict(max_iter=200, schedule="cosine", warmup_iters=20, warmup_factor=0.01)
    assert lr_factor(0, **kw) == pytest.approx(0.01)
    # warm-up and decay multiply while they overlap
    assert lr_factor(10, **kw) == pytest.approx((0.01 * 0.5 + 0.5) * 0.5 * (1 + math.cos(math.pi * 10 / 200)))
    assert lr_factor(20, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))
    assert lr_factor(100, **kw) == pytest.approx(0.5)
    assert lr_factor(150, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_factor(200, **kw) == pytest.approx(0.0, abs=1e-12)


def test_no_warmup_and_unsorted_steps():
    kw = dict(max_iter=10, schedule="step", steps=(8, 4), gamma=0.5, warmup_iters=0)
    assert [lr_factor(i, **kw) for i in (0, 3, 4, 7, 8, 9)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_unknown_schedule_and_bad_max_iter_raise():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="schedule"):
        LRSchedule(opt, max_iter=10, schedule="poly")
    with pytest.raises(ValueError, match="max_iter"):
        LRSchedule(opt, max_iter=0)


def test_schedule_sets_group_lrs_and_round_trips_state():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    cfg = merge(get_config("small_cpu"), {"solver": {"base_lr": 0.1, "max_iter": 50, "schedule": "step",
                                                      "steps": [30], "warmup_iters": 5, "warmup_factor": 0.2}})
    opt = build_optimizer(model, cfg.solver)
    sched = LRSchedule.from_config(opt, cfg.solver)
    assert sched.set_iteration(0) == pytest.approx(0.02)
    assert all(g["lr"] == pytest.approx(0.02) for g in opt.param_groups)
    sched.set_iteration(35)
    assert all(g["lr"] == pytest.approx(0.01) for g in opt.param_groups)
    opt2 = build_optimizer(model, cfg.solver)
    sched2 = LRSchedule.from_config(opt2, cfg.solver)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.iteration == 35 and opt2.param_groups[0]["lr"] == pytest.approx(0.01)


def test_norm_parameters_get_their_own_weight_decay():
    class FrozenBatchNorm2d(nn.Module):   # a project norm by name, with (unusual) trainable params
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), FrozenBatchNorm2d(),
                          nn.Linear(4, 2))
    model[4].bias.requires_grad_(False)
    cfg = merge(get_config("small_cpu"), {"solver": {"weight_decay": 1e-4, "weight_decay_norm": 0.0}})
    opt = build_optimizer(model, cfg.solver)
    assert opt.defaults["momentum"] == cfg.solver.momentum
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for m in (model[1], model[2], model[3]):
        assert all(decay[id(p)] == 0.0 for p in m.parameters())
    for p in (model[0].weight, model[0].bias, model[4].weight):
        assert decay[id(p)] == 1e-4
    assert id(model[4].bias) not in decay   # frozen: not optimised


def test_no_trainable_parameters_raises():
    m = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        param_groups(m, weight_decay=0.0, weight_decay_norm=0.0)


def test_sgd_step_matches_hand_momentum_and_decay():
    p = nn.Parameter(torch.tensor([1.0]))
    model = nn.Module()
    model.p = p
    cfg = merge(get_config("small_cpu"), {"solver": {"base_lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}})
    opt = build_optimizer(model, cfg.solver)
    buf, w = 0.0, 1.0
    for _ in range(3):
        opt.zero_grad()
        (p * 2.0).sum().backward()
        opt.step()
        g = 2.0 + 0.01 * w
        buf = g if buf == 0.0 else 0.9 * buf + g
        w -= 0.1 * buf
    assert p.item() == pytest.approx(w, rel=1e-6)
