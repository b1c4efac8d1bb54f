"""Optimizer and learning-rate schedule (SGD with momentum, linear warm-up, step or cosine decay).

The schedule is a pure function of the iteration, `lr_factor(it)`, so a resumed run sets exactly the
learning rate an uninterrupted one would have used.
"""
from __future__ import annotations

import bisect
import math
import re

import torch
from torch import nn

from ..config import SolverConfig

# Modules whose parameters count as normalisation parameters (cfg.solver.weight_decay_norm).
_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
)


_NORM_NAME = re.compile(r"norm(\d+d)?$")


def _is_norm(module: nn.Module) -> bool:
    # The name test also catches project norms that are not torch subclasses (FrozenBatchNorm2d, LayerNorm2d).
    return isinstance(module, _NORM_TYPES) or _NORM_NAME.search(type(module).__name__.lower()) is not None


def param_groups(model: nn.Module, *, weight_decay: float, weight_decay_norm: float) -> list[dict]:
    """Trainable parameters split into normal and normalisation groups (each with its weight decay)."""
    seen: set[int] = set()
    normal, norm = [], []
    for module in model.modules():
        is_norm = _is_norm(module)
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (norm if is_norm else normal).append(p)
    groups = []
    if normal:
        groups.append({"params": normal, "weight_decay": weight_decay})
    if norm:
        groups.append({"params": norm, "weight_decay": weight_decay_norm})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def build_optimizer(model: nn.Module, solver: SolverConfig) -> torch.optim.SGD:
    groups = param_groups(model, weight_decay=solver.weight_decay, weight_decay_norm=solver.weight_decay_norm)
    return torch.optim.SGD(groups, lr=solver.base_lr, momentum=solver.momentum)


def lr_factor(
    it: int,
    *,
    max_iter: int,
    schedule: str = "step",
    steps: tuple = (),
    gamma: float = 0.1,
    warmup_iters: int = 0,
    warmup_factor: float = 1e-3,
) -> float:
    """Multiplier of the base learning rate at (0-based) iteration it.

    warm-up (it < warmup_iters): linear from warmup_factor at it=0 towards 1 at it=warmup_iters;
    step: gamma ** (number of steps <= it); cosine: (1 + cos(pi * it / max_iter)) / 2.
    The warm-up multiplies the decay, so both apply when they overlap.
    """
    if schedule == "step":
        decay = gamma ** bisect.bisect_right(sorted(steps), it)
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * min(it, max_iter) / max_iter)) if max_iter > 0 else 1.0
    else:
        raise ValueError(f"solver.schedule must be 'step' or 'cosine', got {schedule!r}")
    if it < warmup_iters:
        alpha = it / warmup_iters
        decay *= warmup_factor * (1.0 - alpha) + alpha
    return decay


class LRSchedule:
    """Sets every param group's lr to its base lr times lr_factor(it); call set_iteration(it) before step it."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_iter: int, schedule: str = "step", steps: tuple = (),
                 gamma: float = 0.1, warmup_iters: int = 0, warmup_factor: float = 1e-3):
        if max_iter <= 0:
            raise ValueError(f"solver.max_iter must be positive, got {max_iter}")
        if warmup_iters < 0:
            raise ValueError(f"solver.warmup_iters must be >= 0, got {warmup_iters}")
        self.optimizer = optimizer
        self.kw = dict(max_iter=max_iter, schedule=schedule, steps=tuple(steps), gamma=gamma,
                       warmup_iters=warmup_iters, warmup_factor=warmup_factor)
        lr_factor(0, **self.kw)  # validates the schedule name now rather than at the first step
        self.base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
        self.iteration = 0

    @classmethod
    def from_config(cls, optimizer: torch.optim.Optimizer, solver: SolverConfig) -> LRSchedule:
        return cls(optimizer, max_iter=solver.max_iter, schedule=solver.schedule, steps=solver.steps,
                   gamma=solver.gamma, warmup_iters=solver.warmup_iters, warmup_factor=solver.warmup_factor)

    def factor(self, it: int) -> float:
        return lr_factor(it, **self.kw)

    def set_iteration(self, it: int) -> float:
        """Sets the lrs for iteration it; returns the first group's lr."""
        self.iteration = it
        f = self.factor(it)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.base_lrs = list(state["base_lrs"])
        self.set_iteration(int(state["iteration"]))
