"""The physically smaller network of an SFP-pruned ResNet, equal to the network with zeros (eval mode).

SFP zeroes only conv weights, so in eval mode a pruned channel is not zero but the constant its BN gives
a zero input, c = bias - weight * mean / sqrt(var + eps). The small model keeps that exactly:
- a pruned conv that feeds the residual stream (stem, block output, downsample) keeps its kept filters,
  and its BN output is written into the full-width stream, whose pruned channels hold c;
- a pruned channel that a conv reads directly (after an inner conv, or the stem) is the constant map
  r = relu(c), seen through that conv's zero padding, so its contribution depends on the border: the
  reader drops that input channel and adds the map that a ones image convolved with
  sum_k r_k W_reader[:, k] gives, computed once per input size.
With --prune_bn every c is 0 and the small model is plain slicing.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from classification.models import ConvUnit, build_model, conv_units
from toolkit.surgery import slice_bn, slice_conv, zero_filter_indices


class PrunedInputConv(nn.Module):
    """A conv whose removed input channels were constant maps: conv(x[:, select]) plus their output through
    zero padding, kernel[o, u, v] = sum_k r_k W[o, k, u, v] over the removed channels k.

    `select` (kept input channels) is given when x is the full-width residual stream (a reader of the
    stem); an inner conv's output arrives already narrow. kernel is None when every r_k is 0."""

    def __init__(self, conv: nn.Conv2d, kernel: torch.Tensor | None, select: torch.Tensor | None):
        super().__init__()
        self.conv = conv
        self.register_buffer("kernel", kernel)
        self.register_buffer("select", select)
        self._maps: dict[tuple, torch.Tensor] = {}

    def constant_map(self, in_size: tuple[int, int], out_size: tuple[int, int]) -> torch.Tensor:
        """(out channels, out_h, out_w): the kernel summed over the taps that land inside the input."""
        valid = []
        for n_in, n_out, k, s, p, d in zip(in_size, out_size, self.conv.kernel_size, self.conv.stride,
                                           self.conv.padding, self.conv.dilation):
            pos = torch.arange(n_out, device=self.kernel.device)[:, None] * s - p + \
                torch.arange(k, device=self.kernel.device)[None, :] * d
            valid.append(((pos >= 0) & (pos < n_in)).to(self.kernel))
        rows, cols = valid  # (out_h, kh), (out_w, kw)
        return (self.kernel[:, None, None] * rows[None, :, None, :, None] * cols[None, None, :, None, :]).sum((-1, -2))

    def cached_map(self, in_size: tuple[int, int], out_size: tuple[int, int]) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced (ONNX export): a constant of the graph, no cache
            return self.constant_map(in_size, out_size)
        key = (*in_size, self.kernel.device, self.kernel.dtype, self.kernel._version)
        if key not in self._maps:
            self._maps = {key: self.constant_map(in_size, out_size)}
        return self._maps[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x if self.select is None else x.index_select(1, self.select))
        if self.kernel is None:
            return y
        return y + self.cached_map(tuple(x.shape[-2:]), tuple(y.shape[-2:]))


class ScatterChannels(nn.Module):
    """BN of the kept channels, written into a full-width tensor whose other channels hold `constants`."""

    def __init__(self, bn: nn.BatchNorm2d, kept: torch.Tensor, constants: torch.Tensor):
        super().__init__()
        self.bn = bn
        self.register_buffer("kept", kept)
        self.register_buffer("constants", constants)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        out = self.constants.to(y.dtype).view(1, -1, 1, 1).repeat(y.shape[0], 1, *y.shape[2:])
        return out.index_copy(1, self.kept, y)


def zero_input_constants(bn: nn.BatchNorm2d) -> torch.Tensor:
    """What the BN outputs (eval mode) for a channel whose conv output is zero."""
    with torch.no_grad():
        return nn.functional.batch_norm(torch.zeros(1, bn.num_features, 1, 1, device=bn.weight.device),
                                        bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                                        bn.eps).flatten()


def zero_filters(net: nn.Module, layers: list[str]) -> dict[str, torch.Tensor]:
    """{conv: indices of its all-zero filters} for the pruned convs of a model with zeros (SFP zeroes conv
    weights only, so only they are looked at)."""
    return {name: zero_filter_indices(net.get_submodule(name).weight) for name in layers}


def make_small_model(net: nn.Module, pruned: dict[str, torch.Tensor], with_constants: bool = True) -> nn.Module:
    """A copy of `net` without the `pruned` filters ({conv: indices}); equal to `net` in eval mode.

    with_constants=False drops the pruned channels' BN constants (exact only when they are zero, i.e. with
    --prune_bn); the checkpoint records the choice so that the structure can be rebuilt."""
    units = conv_units(net)
    small = copy.deepcopy(net)
    get = net.get_submodule
    kept, removed = {}, {}
    for u in units:
        n = get(u.conv).out_channels
        gone = torch.as_tensor(pruned.get(u.conv, []), dtype=torch.long).flatten().cpu()
        mask = torch.ones(n, dtype=torch.bool)
        mask[gone] = False
        kept[u.conv], removed[u.conv] = torch.nonzero(mask).flatten(), torch.nonzero(~mask).flatten()
    producer = {reader: u for u in units for reader in u.readers}
    for u in units:
        conv, bn = get(u.conv), get(u.bn)
        src: ConvUnit | None = producer.get(u.conv)
        in_idx = kept[src.conv] if src else torch.arange(conv.in_channels)
        new_conv: nn.Module = slice_conv(conv, kept[u.conv], in_idx)
        if src is not None and len(removed[src.conv]):
            kernel, select = None, None
            if with_constants:
                r = torch.relu(zero_input_constants(get(src.bn))[removed[src.conv]])
                kernel = torch.einsum("okuv,k->ouv", conv.weight.detach()[kept[u.conv]][:, removed[src.conv]], r)
            if src.residual:
                select = kept[src.conv].to(conv.weight.device)
            new_conv = PrunedInputConv(new_conv, kernel, select)
        new_bn: nn.Module = slice_bn(bn, kept[u.conv])
        if u.residual and len(removed[u.conv]):
            constants = zero_input_constants(bn) if with_constants else torch.zeros(bn.num_features)
            constants = constants.clone()
            constants[kept[u.conv]] = 0
            new_bn = ScatterChannels(new_bn, kept[u.conv].to(bn.weight.device), constants.to(bn.weight.device))
        small.set_submodule(u.conv, new_conv)
        small.set_submodule(u.bn, new_bn)
    return small


def inner_only(net: nn.Module, pruned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The deployment choice: remove only inner convs' filters. Residual-stream convs keep their zero filters
    at full width (their BN then gives the constants by itself), so the small model needs no channel
    scatter; fewer MACs are saved, but what is saved turns into speed."""
    inner = {u.conv for u in conv_units(net) if not u.residual}
    return {conv: idx for conv, idx in pruned.items() if conv in inner}


def has_constants(net: nn.Module, pruned: dict[str, torch.Tensor]) -> bool:
    """Whether any pruned channel has a non-zero BN constant (SFP's default, not --prune_bn)."""
    bns = {u.conv: u.bn for u in conv_units(net)}
    return any(bool(zero_input_constants(net.get_submodule(bns[c]))[idx.long()].abs().sum() > 0)
               for c, idx in pruned.items() if len(idx))


def small_checkpoint(arch: str, num_classes: int, net: nn.Module, small: nn.Module,
                     pruned: dict[str, torch.Tensor], with_constants: bool) -> dict:
    """Everything needed to rebuild the small model alone (tensors and plain values only)."""
    kept = {u.conv: [i for i in range(net.get_submodule(u.conv).out_channels)
                     if i not in set(pruned.get(u.conv, torch.empty(0)).tolist())] for u in conv_units(net)}
    return {"arch": arch, "num_classes": num_classes, "kept": kept, "with_constants": with_constants,
            "state_dict": small.state_dict()}


def load_small(checkpoint: dict) -> nn.Module:
    """The small model of `small_checkpoint`, without the full network's weights."""
    net = build_model(checkpoint["arch"], checkpoint["num_classes"])
    pruned = {conv: torch.tensor(sorted(set(range(net.get_submodule(conv).out_channels)) - set(kept)),
                                 dtype=torch.long)
              for conv, kept in checkpoint["kept"].items()}
    small = make_small_model(net, pruned, checkpoint["with_constants"])
    small.load_state_dict(checkpoint["state_dict"])
    return small
