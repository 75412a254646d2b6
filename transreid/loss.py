"""TransReID's loss: identity cross-entropy (label smoothing 0.1) + hard-mined triplet, each
0.5 x global + 0.5 x mean over the JPM locals; plus AMG's distillation from a frozen teacher."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from toolkit import distributed


def hard_triplet_loss(feats: torch.Tensor, labels: torch.Tensor, margin: float | None) -> torch.Tensor:
    """Batch-hard triplet loss on Euclidean distances: the farthest positive and nearest negative of
    each anchor; margin None = soft margin log(1 + exp(d_ap - d_an))."""
    sq = feats.pow(2).sum(1, keepdim=True)
    dist = (sq + sq.T - 2 * feats @ feats.T).clamp(min=1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    d_ap = dist.masked_fill(~same, float("-inf")).max(1).values
    d_an = dist.masked_fill(same, float("inf")).min(1).values
    if margin is None:
        return F.softplus(d_ap - d_an).mean()
    return F.relu(d_ap - d_an + margin).mean()


def half_global_half_locals(values: list[torch.Tensor]) -> torch.Tensor:
    if len(values) == 1:
        return values[0]
    return 0.5 * values[0] + 0.5 * sum(values[1:]) / (len(values) - 1)


def make_loss(cfg) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], torch.Tensor]:
    """loss(logits list, feature list, labels) of this rank's batch.

    Under torchrun the triplet term mines over the features of all N ranks (the global batch). Each rank
    differentiates it through its own features only (the others arrive without gradient, so no collective
    runs inside backward next to DDP's), with the gradient scaled by N; DDP's average over ranks then gives
    exactly the gradient of one process with batch N*B. The identity term is a per-rank mean, whose
    average over ranks is the global mean."""
    smoothing = 0.1 if cfg.MODEL.IF_LABELSMOOTH == "on" else 0.0
    margin = None if cfg.MODEL.NO_MARGIN else cfg.SOLVER.MARGIN
    id_w, tri_w = cfg.MODEL.ID_LOSS_WEIGHT, cfg.MODEL.TRIPLET_LOSS_WEIGHT

    def loss(logits: list[torch.Tensor], feats: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        id_loss = half_global_half_locals([F.cross_entropy(s.float(), labels, label_smoothing=smoothing)
                                           for s in logits])
        world = distributed.world_size()
        all_labels = distributed.gather(labels)
        tri = half_global_half_locals([hard_triplet_loss(gather_own_grad(f.float()), all_labels, margin)
                                       for f in feats])
        if world > 1:
            tri = tri * world - tri.detach() * (world - 1)  # the same value, N x the gradient
        return id_w * id_loss + tri_w * tri
    return loss


def gather_own_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' x in rank order; only this rank's piece carries a gradient."""
    world = distributed.world_size()
    if world == 1:
        return x
    parts = list(distributed.gather(x.detach()).chunk(world))
    parts[distributed.rank()] = x
    return torch.cat(parts)


def distillation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], kind: str, tau: float) -> torch.Tensor:
    """AMG's distillation term (without its alpha): 'soft' = mean over the logit heads of
    KL(teacher || student) at temperature tau, x tau^2 / numel (sum reduction, log targets);
    'hard' = cross-entropy against the teacher's argmax of the global logits."""
    if kind == "hard":
        return F.cross_entropy(student[0].float(), teacher[0].argmax(1))
    terms = [F.kl_div(F.log_softmax(s.float() / tau, 1), F.log_softmax(t.float() / tau, 1), reduction="sum",
                      log_target=True) * tau * tau / s.numel() for s, t in zip(student, teacher)]
    return sum(terms) / len(terms)
