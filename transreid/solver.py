"""TransReID's optimiser and learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn


def make_optimizer(cfg, model: nn.Module, base_lr: float | None = None) -> torch.optim.Optimizer:
    """SGD (or AdamW) with biases at BIAS_LR_FACTOR x lr and WEIGHT_DECAY_BIAS, classifiers at 2 x lr with
    LARGE_FC_LR. Each group remembers its own base lr in 'initial_lr' for the schedule."""
    s = cfg.SOLVER
    lr0 = s.BASE_LR if base_lr is None else base_lr
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr, wd = lr0, s.WEIGHT_DECAY
        if "bias" in name:
            lr, wd = lr0 * s.BIAS_LR_FACTOR, s.WEIGHT_DECAY_BIAS
        if s.LARGE_FC_LR and "classifier" in name:
            lr = lr0 * 2
        groups.setdefault((lr, wd), []).append(p)
    params = [{"params": ps, "lr": lr, "initial_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    if s.OPTIMIZER_NAME == "SGD":
        return torch.optim.SGD(params, lr=lr0, momentum=s.MOMENTUM)
    return torch.optim.AdamW(params, lr=lr0)


def cosine_lr(epoch: int, group_lr: float, base_lr: float, epochs: int, warmup: int) -> float:
    """The lr of a group at `epoch` (1-based) as TransReID's timm CosineLRScheduler gives it: linear from
    0.01 x base_lr over `warmup` epochs, then a cosine from the group's lr to 0.002 x base_lr over `epochs`
    (counted from epoch 0, warm-up included), and 0.002 x base_lr from epoch `epochs` on."""
    lr_min, lr_warm = 0.002 * base_lr, 0.01 * base_lr
    if epoch < warmup:
        return lr_warm + epoch * (group_lr - lr_warm) / warmup
    if epoch >= epochs:
        return lr_min
    return lr_min + 0.5 * (group_lr - lr_min) * (1 + math.cos(math.pi * epoch / epochs))


def set_epoch_lr(optimizer: torch.optim.Optimizer, epoch: int, base_lr: float, epochs: int, warmup: int) -> float:
    """Set every group's lr for `epoch`; returns the lr of the weights (BASE_LR) group."""
    for group in optimizer.param_groups:
        group["lr"] = cosine_lr(epoch, group["initial_lr"], base_lr, epochs, warmup)
    return cosine_lr(epoch, base_lr, base_lr, epochs, warmup)
