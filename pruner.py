"""Filter pruning criteria, one registered function each: L1 (HFP), L2 (SFP), FPGM, BAFD and Taylor.

Public API (other code and checks call it exactly so):
    select_filters(weight, n_prune, criterion, knn=2, efficient=False) -> sorted LongTensor of pruned filters
    bafd_layer_rates(model, arch, prune_rate, max_lrate, knn)          -> {conv weight name: rate}
    select_layers(model, rates, criterion, knn=2, efficient=False)     -> {conv weight name: pruned indices}
    FilterMask                                                          -> select, decay / zero, save, load

`pruned_convs(arch)` says which convs of ft_net are pruned (read from toolkit.wiring, the one wiring table
of the project's ResNets: each conv's BN and consumers), and `equalise_block_rates` how rates are tied
inside a block.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torchvision
from torch import nn

from toolkit.errors import UserError
from toolkit.wiring import resnet_wiring

ARCHS = ("resnet18", "resnet34", "resnet50")  # ft_net backbones; their wiring is read from torchvision's modules
ISCLOSE_RTOL, ISCLOSE_ATOL = 1e-5, 1e-8


class PruneError(UserError):
    """A user-facing problem with pruning arguments; printed as one line."""


# ---------------------------------------------------------------------------------------------------------------
# The layer table


@dataclass(frozen=True)
class PrunedConv:
    """A prunable conv: its BN, the convs that read its output channels, and its place in the block."""
    conv: str  # module name, e.g. "model.layer1.0.conv1"
    bn: str
    block: str | None  # "model.layer1.0"; None for the stem
    is_block_output: bool  # its channels are added to the residual (pruned ones become scattered zeros)
    ranked: bool  # takes part in BAFD's rate allocation
    consumers: tuple[str, ...] = field(default=())  # convs whose input channels are this conv's outputs

    @property
    def weight(self) -> str:
        return f"{self.conv}.weight"

    @property
    def filter_params(self) -> tuple[str, str, str]:
        """The parameters a pruned filter lives in: conv weight, BN weight, BN bias (dim 0 = filter)."""
        return f"{self.conv}.weight", f"{self.bn}.weight", f"{self.bn}.bias"


def pruned_convs(arch: str) -> list[PrunedConv]:
    """Every pruned conv of ft_net's backbone, in model order (toolkit.wiring's table of the backbone).

    resnet18/34: both convs of every basic block (not the stem, not downsample); all are ranked.
    resnet50: the stem and the three convs of every bottleneck (not downsample); the stem and the 3x3
    convs are ranked, and a bottleneck's 1x1 convs take its 3x3 conv's rate.
    """
    if arch not in ARCHS:
        raise PruneError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return list(_pruned_convs(arch))


@functools.lru_cache(maxsize=None)
def _pruned_convs(arch: str) -> tuple[PrunedConv, ...]:
    with torch.device("meta"):  # the structure only: no weights are made
        backbone = getattr(torchvision.models, arch)()
    bottleneck = any(w.role == "inner" and w.kernel_size == (1, 1) for w in resnet_wiring(backbone))
    layers = []
    for w in resnet_wiring(backbone, "model."):
        if w.role == "downsample" or (w.role == "stem" and not bottleneck):
            continue
        ranked = w.role == "stem" or not bottleneck or w.kernel_size == (3, 3)
        layers.append(PrunedConv(w.conv, w.bn, w.block, w.role == "output", ranked, w.consumers))
    return tuple(layers)


def layer_by_weight(arch: str) -> dict[str, PrunedConv]:
    return {layer.weight: layer for layer in pruned_convs(arch)}


def equalise_block_rates(arch: str, rates: dict[str, float]) -> dict[str, float]:
    """resnet18/34: both convs of a block get their mean rate; resnet50: conv1/conv3 get conv2's rate."""
    out = dict(rates)
    blocks: dict[str, list[PrunedConv]] = {}
    for layer in pruned_convs(arch):
        if layer.block:
            blocks.setdefault(layer.block, []).append(layer)
    for convs in blocks.values():
        if arch == "resnet50":
            rate = rates[convs[1].weight]
        else:
            rate = (rates[convs[0].weight] + rates[convs[1].weight]) / 2
        for layer in convs:
            out[layer.weight] = rate
    return out


# ---------------------------------------------------------------------------------------------------------------
# Distances and the incremental BAFD greedy


class Workspace:
    """Reusable buffers for distance matrices. On the CPU a fresh multi-MB tensor costs more (page
    faults on every allocation) than the arithmetic done in it, so a mask reuses its buffers."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor of `shape` (an int n means (n, n)), reusing the buffer of that name."""
        shape = (shape, shape) if isinstance(shape, int) else tuple(shape)
        numel = shape[0] * shape[1]
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self.buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


def squared_distance_matrix(weight: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
    """Squared Euclidean distances between the flattened filters of a conv weight, float64, on its device.

    |a|^2 + |b|^2 - 2 a.b from the Gram matrix, whose lower triangle is mirrored (w @ w.T is not
    bitwise symmetric); pairs that are close relative to their norms (where this form loses precision,
    or goes negative) are recomputed from their differences, so duplicated filters are exactly 0 apart.
    Exactly symmetric with a zero diagonal, like scipy's cdist. With a workspace the result is a view
    into it, valid until the workspace is used again.
    """
    ws = workspace or Workspace()
    flat = weight.detach().flatten(1)
    dev, f64, n = flat.device, torch.float64, flat.shape[0]
    w = ws.get("w", flat.shape, f64, dev).copy_(flat)
    sq = torch.einsum("ij,ij->i", w, w)
    d2 = ws.get("d2", n, f64, dev)
    lower = torch.mm(w, w.T, out=ws.get("gram", n, f64, dev)).mul_(-2)
    lower = lower.add_(torch.add(sq[:, None], sq[None, :], out=d2)).tril_(-1)
    torch.add(lower, lower.T, out=d2).fill_diagonal_(float("inf"))
    close_mask = torch.le(d2, 2e-6 * float(sq.max()), out=ws.get("mask", n, torch.bool, dev))  # superset
    if close_mask.any():  # rare: nonzero over the whole mask costs more than everything else here
        coarse = torch.nonzero(close_mask, as_tuple=True)
        close = d2[coarse] <= 1e-6 * (sq[coarse[0]] + sq[coarse[1]])
        rows, cols = coarse[0][close], coarse[1][close]
        for s in range(0, len(rows), 1 << 14):
            r, c = rows[s:s + (1 << 14)], cols[s:s + (1 << 14)]
            d2[r, c] = ((w[r] - w[c]) ** 2).sum(1)
    return d2.fill_diagonal_(0)  # every negative entry was close, hence recomputed


def distance_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the flattened filters (float64; see squared_distance_matrix)."""
    return squared_distance_matrix(weight).sqrt_()


class GreedyRemoval:
    """The present set S of one layer's filters with each filter's local power (sum of its k smallest
    distances within S, self included), updated as filters leave S.

    Works on squared distances. Each row keeps a sorted window of its nearest filters (square roots
    taken there only). A removal touches only the rows whose k-th nearest present filter is at least
    as far as the removed one; those take the first k present filters of their window again (or
    refill the window from the full row once it runs out). The whole-layer steps (extreme power,
    near-ties, affected rows) are torch ops; the few affected rows are updated in Python, which is
    cheaper than a dozen tensor ops for one or two rows. Mean distances, needed only to break
    near-ties, are summed afresh over S for the tied candidates.
    """

    def __init__(self, d2: torch.Tensor, knn: int, smallest: bool):
        n = d2.shape[0]
        self.n, self.k, self.d2, self.smallest = n, min(knn, n), d2, smallest
        self.window = min(n, knn + 8)
        near_d2, near = torch.topk(d2, self.window, dim=1, largest=False, sorted=True)
        self.near, self.near_d2 = near.tolist(), near_d2.tolist()
        self.near_d = near_d2.sqrt().tolist()
        self.present = torch.ones(n, dtype=torch.bool)
        self.alive = [True] * n  # the same as `present`, for the per-row Python updates
        self.kth_d2 = near_d2[:, self.k - 1].clone()  # squared distance of the k-th nearest present
        self.fill = float("inf") if smallest else float("-inf")  # the local power of a removed filter
        self.power = near_d2[:, :self.k].sqrt().sum(1)

    def mean_distance(self, rows: torch.Tensor) -> torch.Tensor:
        """(sum of distances to the filters in S) / N for the given filters."""
        return torch.where(self.present, self.d2[rows], 0.0).sqrt_().sum(1) / self.n

    def pick(self) -> int:
        """The present filter with the smallest (largest) local power; near-ties (np.isclose) go to the
        smaller (larger) mean distance to S, then to the lowest index."""
        extreme = self.power.min() if self.smallest else self.power.max()
        candidates = torch.nonzero(torch.isclose(self.power, extreme, ISCLOSE_RTOL, ISCLOSE_ATOL)).squeeze(1)
        if len(candidates) == 1:
            return int(candidates[0])
        mean = self.mean_distance(candidates)
        best = mean.min() if self.smallest else mean.max()
        return int(candidates[mean == best][0])

    def remove(self, r: int) -> None:
        self.present[r] = False
        self.alive[r] = False
        self.power[r] = self.fill
        for i in torch.nonzero(self.present & (self.d2[r] <= self.kth_d2)).squeeze(1).tolist():  # d2 symmetric
            self._update_row(i)

    def _update_row(self, i: int) -> None:
        """Local power of row i from the first k present filters of its window."""
        total, found, last_d2 = 0.0, 0, 0.0
        for j, d, d2 in zip(self.near[i], self.near_d[i], self.near_d2[i]):
            if self.alive[j]:
                total, found, last_d2 = total + d, found + 1, d2
                if found == self.k:
                    self.power[i], self.kth_d2[i] = total, last_d2
                    return
        row = torch.where(self.present, self.d2[i], float("inf"))  # window exhausted: refill it
        near_d2, near = torch.topk(row, self.window, largest=False, sorted=True)
        self.near[i], self.near_d2[i] = near.tolist(), near_d2.tolist()
        self.near_d[i] = near_d2.sqrt().tolist()
        self._update_row(i)

    def remaining(self) -> torch.Tensor:
        return torch.nonzero(self.present).squeeze(1)


def bafd_greedy(d2: torch.Tensor, steps: int, knn: int, smallest: bool = True) -> list[int]:
    """Remove `steps` filters one at a time (smallest or largest local power first); returns them in order.
    `d2`: squared distances."""
    greedy = GreedyRemoval(d2.cpu(), knn, smallest)  # a sequential loop of tiny steps: fastest on the CPU
    removed = []
    for _ in range(steps):
        r = greedy.pick()
        greedy.remove(r)
        removed.append(r)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# Selection for one layer and for a model


def _smallest(scores: torch.Tensor, n: int) -> torch.Tensor:
    return torch.argsort(scores, stable=True)[:n]


@dataclass(frozen=True)
class Criterion:
    """How one criterion picks the filters of a conv to prune. `select(weight, n_prune, knn, efficient,
    workspace, scores)` returns their indices (any order, 0 < n_prune < N). `needs` says what it reads:
    "weights" (the conv weight) or "taylor" (per-filter activation x gradient scores that the caller
    gathers on training batches, passed as `scores`)."""
    name: str
    select: Callable[..., torch.Tensor]
    needs: str = "weights"


CRITERIA_REGISTRY: dict[str, Criterion] = {}


def register_criterion(name: str, needs: str = "weights") -> Callable:
    """Decorator: add a selection function to the registry under `name` (select_filters, FilterMask and the
    --criterion choices then know it)."""
    def add(select: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        CRITERIA_REGISTRY[name] = Criterion(name, select, needs)
        return select
    return add


@register_criterion("l1")
def l1_norm(weight: torch.Tensor, n_prune: int, **_) -> torch.Tensor:
    """HFP: the smallest L1 norms."""
    return _smallest(weight.detach().flatten(1).double().abs().sum(1), n_prune)


@register_criterion("l2")
def l2_norm(weight: torch.Tensor, n_prune: int, **_) -> torch.Tensor:
    """SFP: the smallest L2 norms."""
    return _smallest(weight.detach().flatten(1).double().norm(dim=1), n_prune)


@register_criterion("fpgm")
def geometric_median(weight: torch.Tensor, n_prune: int, workspace: Workspace | None = None, **_) -> torch.Tensor:
    """FPGM: the smallest summed distances to the other filters (nearest the geometric median)."""
    return _smallest(squared_distance_matrix(weight, workspace).sqrt_().sum(1), n_prune)


@register_criterion("bafd")
def adjacent_filters(weight: torch.Tensor, n_prune: int, knn: int = 2, efficient: bool = False,
                     workspace: Workspace | None = None, **_) -> torch.Tensor:
    """BAFD: greedily the smallest local power (sum of the k nearest distances); FPGM's rule once k covers
    what stays; with `efficient` and more than half pruned, the keep set is built instead."""
    n = weight.shape[0]
    if knn >= n - n_prune:  # BAFD's global rule
        return geometric_median(weight, n_prune, workspace=workspace)
    d2 = squared_distance_matrix(weight, workspace)
    if efficient and n_prune / n > 0.5:  # build the keep set: largest local power first
        keep = torch.tensor(bafd_greedy(d2, n - n_prune, knn, smallest=False))
        mask = torch.ones(n, dtype=torch.bool)
        mask[keep] = False
        return torch.nonzero(mask).squeeze(1)
    return torch.tensor(bafd_greedy(d2, n_prune, knn, smallest=True))


@register_criterion("taylor", needs="taylor")
def taylor_importance(weight: torch.Tensor, n_prune: int, scores: torch.Tensor | None = None, **_) -> torch.Tensor:
    """First-order Taylor importance (Molchanov et al.): the smallest accumulated |sum of activation x gradient|
    of the filter's output map (`scores`, gathered by toolkit.hooks.TaylorScores)."""
    if scores is None or scores.shape != (weight.shape[0],):
        raise PruneError("the taylor criterion needs one accumulated score per filter (see toolkit.hooks)")
    return _smallest(scores.detach().double().cpu(), n_prune)


def check_criterion(criterion: str) -> Criterion:
    if criterion not in CRITERIA_REGISTRY:
        raise PruneError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA_REGISTRY)}")
    return CRITERIA_REGISTRY[criterion]


CRITERIA = tuple(CRITERIA_REGISTRY)  # the registered names (a criterion registered later is in CRITERIA_REGISTRY)


def select_filters(weight: torch.Tensor, n_prune: int, criterion: str, knn: int = 2,
                   efficient: bool = False, workspace: Workspace | None = None,
                   scores: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted indices of the `n_prune` filters of one conv weight (N, C, kh, kw) to prune."""
    chosen_by = check_criterion(criterion)
    n = weight.shape[0]
    n_prune = max(0, min(int(n_prune), n))
    if n_prune == 0:
        return torch.empty(0, dtype=torch.long)
    chosen = chosen_by.select(weight, n_prune, knn=knn, efficient=efficient, workspace=workspace, scores=scores)
    return torch.sort(chosen.cpu().long()).values


def conv_weights(model: nn.Module, names) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise PruneError(f"the model has no parameter {missing[0]} (wrong --network_arch?)")
    return {n: params[n] for n in names}


def select_layers(model: nn.Module, rates: dict[str, float], criterion: str, knn: int = 2,
                  efficient: bool = False, workspace: Workspace | None = None,
                  scores: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{conv weight name: sorted pruned indices} with n_prune = int(N * rate) per layer, on the current weights
    (and, for a criterion that needs them, the per-filter `scores` of each conv weight name)."""
    selected, workspace = {}, workspace or Workspace()
    for name, weight in conv_weights(model, rates).items():
        n_prune = int(weight.shape[0] * rates[name])
        selected[name] = select_filters(weight, n_prune, criterion, knn, efficient and rates[name] > 0.5, workspace,
                                        None if scores is None else scores.get(name))
    return selected


def uniform_rates(arch: str, rate: float) -> dict[str, float]:
    """The same rate for every pruned conv (SFP, FPGM, HFP)."""
    check_rate(rate, "--prune_rate")
    return {layer.weight: rate for layer in pruned_convs(arch)}


def check_rate(rate: float, flag: str) -> None:
    if not 0 <= rate < 1:
        raise PruneError(f"{flag} must be in [0, 1), got {rate}")


# ---------------------------------------------------------------------------------------------------------------
# BAFD rate allocation


def bafd_score_sequence(weight: torch.Tensor, knn: int, workspace: Workspace | None = None) -> torch.Tensor:
    """The removed filters' local powers in greedy order while |S| > k, then each remaining filter's
    summed distance to the remaining ones; L2-normalised (float64, one entry per filter)."""
    d2 = squared_distance_matrix(weight, workspace).cpu()
    n = d2.shape[0]
    greedy = GreedyRemoval(d2, knn, smallest=True)
    scores = []
    for _ in range(max(n - knn, 0)):
        r = greedy.pick()
        scores.append(float(greedy.power[r]))
        greedy.remove(r)
    rest = greedy.remaining()
    scores += d2[rest][:, rest].sqrt().sum(1).tolist()
    seq = torch.tensor(scores, dtype=torch.float64)
    norm = seq.norm()
    return seq / norm if norm > 0 else seq


def allocate_filters(weights: list[torch.Tensor], prune_rate: float, max_lrate: float, knn: int) -> list[int]:
    """Filters allotted to each ranked layer: walk the pooled score sequences in ascending order
    (stable: layer order, then sequence order), skipping layers at their cap int(max_lrate * N),
    until int(T * prune_rate) filters are counted."""
    sizes = [w.shape[0] for w in weights]
    workspace = Workspace()
    pooled = torch.cat([bafd_score_sequence(w, knn, workspace) for w in weights])
    owner = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    caps = [int(max_lrate * n) for n in sizes]
    target = int(sum(sizes) * prune_rate)
    counts, total = [0] * len(sizes), 0
    for i in owner[torch.argsort(pooled, stable=True)].tolist():
        if total >= target:
            break
        if counts[i] < caps[i]:
            counts[i] += 1
            total += 1
    return counts


def bafd_layer_rates(model: nn.Module, arch: str, prune_rate: float, max_lrate: float, knn: int
                     ) -> dict[str, float]:
    """Per-layer prune rates from the ranked layers' initial weights, equalised per block."""
    check_rate(prune_rate, "--prune_rate")
    check_rate(max_lrate, "--max_lrate")
    if knn < 1:
        raise PruneError(f"--knn must be at least 1, got {knn}")
    ranked = [layer.weight for layer in pruned_convs(arch) if layer.ranked]
    weights = conv_weights(model, ranked)
    counts = allocate_filters([weights[n] for n in ranked], prune_rate, max_lrate, knn)
    rates = {name: c / weights[name].shape[0] for name, c in zip(ranked, counts)}
    return dict(zip(layer_by_weight(arch), _all_layer_rates(arch, rates)))


def _all_layer_rates(arch: str, ranked_rates: dict[str, float]) -> list[float]:
    filled = {layer.weight: ranked_rates.get(layer.weight, 0.0) for layer in pruned_convs(arch)}
    equal = equalise_block_rates(arch, filled)
    return [equal[layer.weight] for layer in pruned_convs(arch)]


# ---------------------------------------------------------------------------------------------------------------
# Applying a selection: conv weight + BN weight and bias


def _scale_filters(tensors: dict[str, torch.Tensor], arch: str, selected: dict[str, torch.Tensor],
                   factor: float) -> None:
    """In place: the selected filters of each layer times `factor` in all their tensors (0: exactly 0)."""
    table = layer_by_weight(arch)
    for name, idx in selected.items():
        for key in table[name].filter_params:
            tensor = tensors[key]
            i = idx.to(tensor.device)
            if factor == 0:
                tensor.index_fill_(0, i, 0.0)
            else:
                tensor[i] *= factor


class FilterMask:
    """Per-layer rates and criterion; selects filters on the current weights and decays or zeroes them.

    The selected indices are kept per layer (conv weight name -> LongTensor) and saved with state_dict(),
    so a resumed run and test_small.py see the same masks.
    """

    def __init__(self, arch: str, rates: dict[str, float], criterion: str, knn: int = 2, efficient: bool = False):
        check_criterion(criterion)
        self.arch, self.rates, self.criterion = arch, dict(rates), criterion
        self.knn, self.efficient = knn, efficient
        self.selected: dict[str, torch.Tensor] = {}
        self.workspace = Workspace()

    def select(self, model: nn.Module, scores: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        self.selected = select_layers(model, self.rates, self.criterion, self.knn, self.efficient, self.workspace,
                                      scores)
        return self.selected

    @torch.no_grad()
    def apply(self, model: nn.Module, factor: float, selected: dict[str, torch.Tensor] | None = None) -> None:
        """Multiply the selected filters' conv weight, BN weight and BN bias by `factor` (0: set exactly 0)."""
        _scale_filters(dict(model.named_parameters()), self.arch, self.selected if selected is None else selected,
                       factor)

    def zeroed_state(self, model: nn.Module) -> dict:
        """A copy of the model's state dict with a fresh selection set to exactly 0 (the model is untouched)."""
        selected = select_layers(model, self.rates, self.criterion, self.knn, self.efficient, self.workspace)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _scale_filters(state, self.arch, selected, 0.0)
        return state

    def state_dict(self) -> dict:
        return {"arch": self.arch, "rates": dict(self.rates), "criterion": self.criterion, "knn": self.knn,
                "efficient": self.efficient, "selected": {k: v.clone() for k, v in self.selected.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.arch, self.rates, self.criterion = state["arch"], dict(state["rates"]), state["criterion"]
        self.knn, self.efficient = state["knn"], state["efficient"]
        self.selected = {k: v.clone() for k, v in state["selected"].items()}
