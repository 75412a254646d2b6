"""Training losses of the shared loop: the reference triplet loss, circle loss and softmax cross-entropy.

`--loss` names one or several of them joined by '+', e.g. `triplet` (the paper), `softmax+circle`
(the LPCV edge recipe). The total loss is their plain sum.

Every loss is written as a sum over this rank's own anchors against the whole (all ranks') batch,
divided by a global count where it is a mean, so that the per-rank losses add up to the loss of one
process with the whole batch (see train_loop.loss_and_backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from toolkit import data, distributed

LOSSES = ("triplet", "circle", "softmax")


class LossError(ValueError):
    """A bad --loss value; printed as one line."""


def parse_losses(spec: str) -> tuple[str, ...]:
    """'softmax+circle' -> ('softmax', 'circle'); a LossError names an unknown or repeated loss."""
    names = tuple(s.strip() for s in spec.split("+") if s.strip())
    unknown = [n for n in names if n not in LOSSES]
    if not names or unknown or len(set(names)) != len(names):
        raise LossError(f"--loss {spec!r}: give one or more of {', '.join(LOSSES)} joined by '+', each once")
    return names


def mine_triplets(f: torch.Tensor, pf: torch.Tensor, labels: torch.Tensor, poolsize: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine scores of each anchor with its hard positive and its hard negative.

    f: (B, D) anchor features, pf: (4B, D) positives (4 per anchor, anchor-major), both L2-normalised.
    Hard positive: the least similar of the anchor's 4 positives. Hard negative: the most similar
    sample of another id among a random pool of `poolsize` positives of the whole (all ranks') batch;
    score 0 when the pool has none. Indices are mined without gradient; the scores carry gradient to
    all three features (across ranks too).
    """
    b = f.shape[0]
    pos_scores = torch.einsum("bd,bkd->bk", f, pf.view(b, data.NUM_POSITIVES, -1))
    s_pos = pos_scores.gather(1, pos_scores.detach().argmin(1, keepdim=True)).squeeze(1)
    all_pf = distributed.gather_with_grad(pf)
    all_labels = distributed.gather(labels.repeat_interleave(data.NUM_POSITIVES))
    pool = torch.randperm(all_pf.shape[0], generator=generator)[:poolsize].to(f.device)
    neg_scores = f @ all_pf[pool].T
    masked = neg_scores.detach().masked_fill(labels[:, None] == all_labels[pool][None, :], float("-inf"))
    best, hard = masked.max(1)
    s_neg = neg_scores.gather(1, hard[:, None]).squeeze(1) * torch.isfinite(best)
    return s_pos, s_neg


def triplet_loss(s_pos: torch.Tensor, s_neg: torch.Tensor, margin: float) -> torch.Tensor:
    """The reference loss: sum over anchors of relu(s_neg - s_pos + margin)."""
    return F.relu(s_neg - s_pos + margin).sum()


def circle_loss(feats: torch.Tensor, labels: torch.Tensor, all_feats: torch.Tensor, all_labels: torch.Tensor,
                offset: int, total: int, m: float = 0.25, gamma: float = 64.0) -> torch.Tensor:
    """Pairwise circle loss (Sun et al., CVPR 2020, Eq. 6 with the re-ID margins), one term per anchor:

        l_i = softplus(logsumexp_p(-gamma * a_p * (s_p - (1 - m))) + logsumexp_n(gamma * a_n * (s_n - m)))
        a_p = relu(1 + m - s_p), a_n = relu(s_n + m)  (weights, not differentiated)

    s_p / s_n: cosine similarities of anchor i with every other sample of the same / another id.
    feats (n, D) are this rank's L2-normalised anchors, the rows offset..offset+n of all_feats (N, D);
    the result is sum_i l_i / total (total = anchors over all ranks, so the ranks' results add up to
    the batch mean). An anchor with no positive or no negative pair adds 0.
    """
    s = feats @ all_feats.T
    n = feats.shape[0]
    own = torch.zeros_like(s, dtype=torch.bool)
    own[torch.arange(n), offset + torch.arange(n)] = True
    same = (labels[:, None] == all_labels[None, :]) & ~own
    diff = labels[:, None] != all_labels[None, :]
    alpha_p = F.relu(1 + m - s.detach())
    alpha_n = F.relu(s.detach() + m)
    logit_p = (-gamma * alpha_p * (s - (1 - m))).masked_fill(~same, float("-inf"))
    logit_n = (gamma * alpha_n * (s - m)).masked_fill(~diff, float("-inf"))
    usable = same.any(1) & diff.any(1)
    if not usable.any():
        return s.sum() * 0.0
    per_anchor = F.softplus(torch.logsumexp(logit_p[usable], 1) + torch.logsumexp(logit_n[usable], 1))
    return per_anchor.sum() / total


def softmax_loss(logits: torch.Tensor, labels: torch.Tensor, total: int) -> torch.Tensor:
    """Cross-entropy of the identity classifier, summed here and divided by the global sample count."""
    return F.cross_entropy(logits, labels, reduction="sum") / total


def batch_loss(losses: tuple[str, ...], f: torch.Tensor, pf: torch.Tensor, logits: torch.Tensor,
               plogits: torch.Tensor, labels: torch.Tensor, margin: float, poolsize: int,
               generator: torch.Generator, circle_m: float = 0.25, circle_gamma: float = 64.0
               ) -> tuple[torch.Tensor, dict]:
    """The summed loss of one rank's batch (anchors f, positives pf and their classifier logits) and
    the detached pieces the log reports (s_pos / s_neg of the mined triplets, id accuracy)."""
    s_pos, s_neg = mine_triplets(f, pf, labels, poolsize, generator)  # also logged without the triplet loss
    plabels = labels.repeat_interleave(data.NUM_POSITIVES)
    total = torch.zeros((), device=f.device)
    stats = {"s_pos": s_pos.detach(), "s_neg": s_neg.detach()}
    if "triplet" in losses:
        total = total + triplet_loss(s_pos, s_neg, margin)
    n_local = f.shape[0] + pf.shape[0]
    n_global = n_local * distributed.world_size()
    if "circle" in losses:
        feats, flabels = torch.cat([f, pf]), torch.cat([labels, plabels])
        all_feats, all_labels = distributed.gather_with_grad(feats), distributed.gather(flabels)
        total = total + circle_loss(feats, flabels, all_feats, all_labels, distributed.rank() * n_local,
                                    n_global, circle_m, circle_gamma)
    if "softmax" in losses:
        all_logits, all_labels = torch.cat([logits, plogits]), torch.cat([labels, plabels])
        total = total + softmax_loss(all_logits, all_labels, n_global)
        stats["id_correct"] = (all_logits.detach().argmax(1) == all_labels).sum()
    return total, stats
