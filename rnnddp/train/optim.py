"""Optimiser and LR schedule from their config sections; the schedule is a pure function of the step."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adamw", "adam", "sgd")  # optim.name
SCHEDULES = ("constant", "cosine", "onecycle")  # sched.name


def build_optimizer(model: nn.Module, cfg: Any, capturable: bool = False) -> torch.optim.Optimizer:
    """``capturable``: the Adam step may be recorded in a CUDA graph (train.cuda_graph)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        # The fused kernel on CPU too (see docs/performance.md).
        return cls(
            params,
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay,
            fused=True,
            capturable=capturable,
        )
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, cfg: Any) -> float:
    """The LR multiplier at ``step`` (0-based): a pure function of the step, so resume is exact."""
    if cfg.name == "onecycle":
        # Cosine rise from lr/25 to lr over pct_start, cosine fall to lr/1e4 (OneCycleLR's shape).
        rise = max(1, round(cfg.pct_start * total_steps))
        lo, floor = 1 / 25, 1 / 25e4
        if step < rise:
            return lo + (1 - lo) * 0.5 * (1 - math.cos(math.pi * step / rise))
        t = min(1.0, (step - rise) / max(1, total_steps - rise))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "cosine":
        t = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: Any) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))


def total_steps(epochs: int, max_steps: int, steps_per_epoch: int) -> int:
    """Optimiser steps of the whole run: ``epochs`` epochs, capped by ``max_steps`` when > 0."""
    steps = epochs * steps_per_epoch
    return min(steps, max_steps) if max_steps else steps
