"""AMG: attention-map-guided pruning of a TransReID ViT's tokens and heads.

One pruning decision, from score to removed weights:
1. a scoring epoch runs with `TokenScorer` or `HeadEntropyScorer` attached to the prunable blocks (the
   backbone's blocks[:-1]); they read every post-softmax attention map (and, for tokens, its gradient);
2. `select_tokens` / `select_heads` turn the accumulated per-layer scores into keep masks, pooled over
   all layers under one global threshold;
3. `apply_token_masks` fixes the token positions each block processes (the others bypass it) and
   `remove_heads` cuts the dropped heads out of qkv and proj.
`amg_macs` is the cost AMG reports for the result.
"""
from __future__ import annotations

import torch
from torch import nn

from transreid.model import Attention, Block, TransReID

LAYER_DECAY = 0.015  # token scores of prunable layer l are weighted by 1 - 0.015 l
HEAD_ALPHA_STEP = 0.005  # head entropies of the k-th multi-head layer are weighted by 1 + 0.005 k


def select_tokens(layer_scores: list[torch.Tensor], n_prune: int,
                  keep: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Keep masks over the patch tokens (CLS excluded) of each prunable layer.

    Each layer's raw accumulated scores are divided by their L2 norm and weighted by (1 - 0.015 l); over
    all layers pooled, t is the n-th smallest value (0-based index n of the ascending sort), and a slot is
    kept iff its value >= t (ties at t are kept). With `keep` (earlier rounds' masks) only the slots still
    kept take part, and n_prune more of them are removed."""
    if keep is None:
        keep = [torch.ones(len(s), dtype=torch.bool) for s in layer_scores]
    weighted = []
    for layer, s in enumerate(layer_scores):
        norm = s.norm()
        s = s / norm if norm > 0 else s  # an all-zero layer stays all zero
        weighted.append(torch.where(keep[layer].to(s.device), s * (1 - LAYER_DECAY * layer),
                                    torch.full_like(s, float("-inf"))))
    pooled = torch.cat(weighted)
    n_removed = int((~torch.cat(keep)).sum())
    if n_prune <= 0:
        return [k.clone() for k in keep]
    if n_removed + n_prune >= len(pooled):
        raise ValueError(f"cannot remove {n_prune} more of the {len(pooled) - n_removed} kept token slots")
    t = pooled.sort().values[n_removed + n_prune]
    return [w >= t for w in weighted]


def select_heads(head_entropies: list[torch.Tensor], n_prune: int) -> list[torch.Tensor]:
    """Keep masks over the heads of each prunable layer.

    Layers with more than one head weight their entropies by alpha (1 for the first such layer, +0.005 for
    each next one); pooled over those layers, t is the n-th largest weighted entropy and heads >= t are
    removed (ties remove more). A one-head layer keeps its head, and a layer never loses its last head:
    if all of a layer's heads reach t, its lowest-entropy head stays."""
    masks = [torch.ones(len(e), dtype=torch.bool) for e in head_entropies]
    multi = [i for i, e in enumerate(head_entropies) if len(e) > 1]
    if n_prune <= 0 or not multi:
        return masks
    weighted = {i: head_entropies[i] * (1 + HEAD_ALPHA_STEP * k) for k, i in enumerate(multi)}
    pooled = torch.cat([weighted[i] for i in multi])
    t = pooled.sort(descending=True).values[min(n_prune, len(pooled)) - 1]
    for i in multi:
        masks[i] = weighted[i] < t
        if not masks[i].any():
            masks[i][weighted[i].argmin()] = True
    return masks


def head_entropy(mean_attn: torch.Tensor) -> torch.Tensor:
    """[H, Nq, Nk] mean attention map -> [H] entropies in bits, mean over queries (0 log 0 = 0)."""
    return -torch.special.xlogy(mean_attn, mean_attn).sum(-1).mean(-1) / torch.log(torch.tensor(2.0,
                                                                                                 dtype=mean_attn.dtype))


def amg_macs(tokens: list[int], heads: list[int], dim: int, mlp_hidden: int, head_dim: int) -> int:
    """AMG's cost of the prunable blocks (MACs): per block with N tokens (kept patches + CLS), H heads and
    Dh = H * head_dim: qkv 3 N Dh D, q.k N^2 Dh, scale/softmax H N^2, attn.v N^2 Dh, proj N Dh D, MLP 2 N D M.
    Patch embedding, norms, the last block, the JPM branches and the heads are not counted."""
    total = 0
    for n, h in zip(tokens, heads):
        dh = h * head_dim
        total += 3 * n * dh * dim + n * n * dh + h * n * n + n * n * dh + n * dh * dim + 2 * n * dim * mlp_hidden
    return total


def model_amg_macs(model: TransReID) -> int:
    blocks = model.prunable_blocks
    return amg_macs(model.tokens_per_layer(), [b.attn.heads for b in blocks], model.base.cls_token.shape[-1],
                    blocks[0].mlp.fc1.out_features, blocks[0].attn.head_dim)


class _Scorer:
    """Attaches to the prunable blocks' attention modules; detach() when done."""

    def __init__(self, model: TransReID):
        self.blocks: list[Block] = model.prunable_blocks
        self.num_tokens = model.base.patch_embed.num_patches + 1
        for i, blk in enumerate(self.blocks):
            blk.attn.recorder = (lambda attn, i=i: self.record(i, attn))

    def record(self, layer: int, attn: torch.Tensor) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        for blk in self.blocks:
            blk.attn.recorder = None


class TokenScorer(_Scorer):
    """Per prunable layer and batch, |sum over batch, heads, queries of A * dLoss/dA| / (B H Nq) for every
    key token, added up over the epoch (float64) and returned per patch position (CLS excluded; tokens the
    layer does not process score 0). A constant loss scale scales every layer alike: selection ignores it."""

    def __init__(self, model: TransReID):
        super().__init__(model)
        self.scores = [torch.zeros(self.num_tokens, dtype=torch.float64) for _ in self.blocks]

    def record(self, layer: int, attn: torch.Tensor) -> None:
        if attn.requires_grad:
            saved = attn.detach()
            attn.register_hook(lambda grad: self.add(layer, saved, grad))

    def add(self, layer: int, attn: torch.Tensor, grad: torch.Tensor) -> None:
        b, h, nq, _ = attn.shape
        per_key = ((attn.double() * grad.double()).sum(dim=(0, 1, 2)).abs() / (b * h * nq)).cpu()
        keep = self.blocks[layer].keep
        if keep is None:
            self.scores[layer] += per_key
        else:
            self.scores[layer].index_add_(0, keep.cpu(), per_key)

    def patch_scores(self) -> list[torch.Tensor]:
        return [s[1:] for s in self.scores]


class HeadEntropyScorer(_Scorer):
    """Per prunable layer, the sum of post-softmax maps over full batches; entropies() = head_entropy of
    their mean M = sum A / (B c)."""

    def __init__(self, model: TransReID, batch_size: int):
        super().__init__(model)
        self.batch_size = batch_size
        self.sums: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.count = [0] * len(self.blocks)

    def record(self, layer: int, attn: torch.Tensor) -> None:
        if attn.shape[0] != self.batch_size:
            return
        s = attn.detach().double().sum(0).cpu()
        self.sums[layer] = s if self.sums[layer] is None else self.sums[layer] + s
        self.count[layer] += 1

    def entropies(self) -> list[torch.Tensor]:
        if not all(self.count):
            raise ValueError("no full batch was scored")
        return [head_entropy(s / (self.batch_size * c)) for s, c in zip(self.sums, self.count)]


def token_masks(model: TransReID) -> list[torch.Tensor]:
    """The current keep masks over patch positions (CLS excluded) of the prunable blocks."""
    p = model.base.patch_embed.num_patches
    masks = []
    for blk in model.prunable_blocks:
        m = torch.ones(p + 1, dtype=torch.bool)
        if blk.keep is not None:
            m[:] = False
            m[blk.keep.cpu()] = True
        masks.append(m[1:])
    return masks


def apply_token_masks(model: TransReID, masks: list[torch.Tensor]) -> None:
    """Each prunable block processes CLS and the patches its mask keeps; the others bypass it."""
    model.set_token_keep([[0] + (torch.nonzero(m).flatten() + 1).tolist() for m in masks])


def remove_heads(attn: Attention, keep: torch.Tensor) -> None:
    """Cut the heads not in `keep` out of qkv ([3, H, hd, D] rows) and proj ([D, H, hd] columns); proj's
    bias stays. The module computes exactly what it computed with those heads' outputs set to zero."""
    if bool(keep.all()):
        return
    keep = keep.to(attn.qkv.weight.device)
    h, hd = attn.heads, attn.head_dim
    dim = attn.qkv.in_features
    qkv = nn.Linear(dim, 3 * int(keep.sum()) * hd, bias=attn.qkv.bias is not None).to(attn.qkv.weight)
    proj = nn.Linear(int(keep.sum()) * hd, attn.proj.out_features).to(attn.proj.weight)
    with torch.no_grad():
        qkv.weight.copy_(attn.qkv.weight.view(3, h, hd, dim)[:, keep].reshape(-1, dim))
        if attn.qkv.bias is not None:
            qkv.bias.copy_(attn.qkv.bias.view(3, h, hd)[:, keep].reshape(-1))
        proj.weight.copy_(attn.proj.weight.view(-1, h, hd)[:, keep].reshape(attn.proj.out_features, -1))
        proj.bias.copy_(attn.proj.bias)
    attn.qkv, attn.proj, attn.heads = qkv, proj, int(keep.sum())


def apply_head_masks(model: TransReID, masks: list[torch.Tensor]) -> None:
    for blk, keep in zip(model.prunable_blocks, masks):
        remove_heads(blk.attn, keep)


def prune_counts(model: TransReID, mode: str, rate: float) -> int:
    """AMG's totals: int(P L rate) token slots or int(H L rate) heads (P patches, H heads of the
    architecture, L prunable layers)."""
    layers = len(model.prunable_blocks)
    if mode == "attn":
        return int(model.base.patch_embed.num_patches * layers * rate)
    heads = max(model.heads_per_layer())  # the last block is never pruned: it has the architecture's count
    return int(heads * layers * rate)


def split_over_rounds(total: int, rounds: int) -> list[int]:
    """`total` removals spread evenly over `rounds` (the first total % rounds rounds take one more)."""
    return [total // rounds + (1 if r < total % rounds else 0) for r in range(rounds)]
