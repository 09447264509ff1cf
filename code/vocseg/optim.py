"""Optimiser and schedule of the DeepLab recipe: SGD, head at 10x the backbone LR, poly decay per step."""

import torch
from torch.optim.lr_scheduler import PolynomialLR

from vocseg.models import head_parameters


def param_groups(model, lr: float, head_lr_mult: float) -> list:
    """Backbone at ``lr``, the freshly initialised heads at ``lr * head_lr_mult`` (named for the logs)."""
    backbone, head = head_parameters(model)
    groups = [{"params": backbone, "lr": lr, "name": "backbone"}]
    if head:
        groups.append({"params": head, "lr": lr * head_lr_mult, "name": "head"})
    return groups


def sgd(
    model,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    head_lr_mult: float = 10.0,
    nesterov: bool = False,
) -> torch.optim.SGD:
    return torch.optim.SGD(
        param_groups(model, lr, head_lr_mult), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )


def adamw(model, lr: float, weight_decay: float = 1e-2, head_lr_mult: float = 1.0) -> torch.optim.AdamW:
    """AdamW with the same backbone / head groups; it learns faster than SGD from random init."""
    return torch.optim.AdamW(param_groups(model, lr, head_lr_mult), lr=lr, weight_decay=weight_decay)


def poly_lr(optimizer, num_steps: int, power: float = 0.9) -> PolynomialLR:
    """Poly decay to zero over ``num_steps`` optimiser steps (the trainer steps it once per update)."""
    return PolynomialLR(optimizer, total_iters=max(1, num_steps), power=power)


def optimizer_steps(train_loader, num_epochs: int, accumulation_steps: int = 1) -> int:
    """The optimiser steps a run takes: the trainer updates on every ``accumulation_steps``-th micro-batch
    counted over the whole run, across epoch boundaries."""
    return num_epochs * len(train_loader) // accumulation_steps
