"""Physically smaller ft_net: pruned filters removed, not zeroed.

Inner convs lose their pruned filters (and their BN the matching entries); the next conv loses the
matching input channels. A block's last conv keeps only its kept outputs, which are added into the
full-width residual at their channel positions (`out_index`), so block outputs keep full width and the
small model computes what the zeroed model computes, up to float rounding.

A small model's state dict is self-describing: reference key names with smaller shapes, plus each
block's `out_index` buffer. `small_model_from_state_dict(torch.load(path, weights_only=True))` rebuilds it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import model as model_lib
import pruner
from toolkit.run import state_dict_mismatch


class PrunedBlock(nn.Module):
    """A torchvision BasicBlock / Bottleneck whose last conv produces only the channels `out_index`."""

    def __init__(self, block: nn.Module, out_index: torch.Tensor, width: int):
        super().__init__()
        self.bottleneck = hasattr(block, "conv3")
        names = ("conv1", "bn1", "conv2", "bn2") + (("conv3", "bn3") if self.bottleneck else ())
        for name in names + ("downsample",):  # reference attribute names keep the state-dict keys
            setattr(self, name, getattr(block, name))
        self.relu = nn.ReLU(inplace=True)
        self.register_buffer("out_index", out_index.clone().long())
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        if self.bottleneck:
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
        else:
            out = self.bn2(self.conv2(out))
        if out.shape[1] == self.width:
            out = out + identity
        else:
            out = identity.index_add(1, self.out_index, out)  # pruned channels: identity + 0
        return self.relu(out)


def zero_filter_indices(*tensors: torch.Tensor) -> torch.Tensor:
    """Indices along dim 0 where every tensor (a conv weight, and optionally its BN weight and bias) is
    exactly zero: the filters a zeroing pruner removed. Shared by the re-ID and classification small models."""
    zero = torch.stack([t.detach().flatten(1).abs().sum(1) == 0 if t.dim() > 1 else t.detach() == 0
                        for t in tensors]).all(0)
    return torch.nonzero(zero).flatten().cpu()


def zero_filters(net: nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """{conv weight name: indices of filters whose conv weight, BN weight and BN bias are all 0}."""
    params = dict(net.named_parameters())
    return {layer.weight: zero_filter_indices(*(params[k] for k in layer.filter_params))
            for layer in pruner.pruned_convs(arch)}


def kept_filters(net: nn.Module, arch: str, pruned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The complement of `pruned` per layer; a layer keeps at least one filter (a zero one if need be,
    which changes nothing: the channel it feeds stays zero)."""
    modules = dict(net.named_modules())
    kept = {}
    for layer in pruner.pruned_convs(arch):
        n = modules[layer.conv].out_channels
        mask = torch.ones(n, dtype=torch.bool)
        mask[pruned.get(layer.weight, torch.empty(0, dtype=torch.long))] = False
        if not mask.any():
            mask[0] = True
        kept[layer.weight] = torch.nonzero(mask).squeeze(1)
    return kept


def slice_conv(conv: nn.Conv2d, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None) -> nn.Conv2d:
    """A new conv with the filters `out_idx` and input channels `in_idx` of `conv` (None: all)."""
    w = conv.weight.detach()
    if out_idx is not None:
        w = w[out_idx.to(w.device)]
    if in_idx is not None:
        w = w[:, in_idx.to(w.device)]
    new = nn.Conv2d(w.shape[1], w.shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None).to(w.device)
    new.weight.data.copy_(w)
    if conv.bias is not None:
        new.bias.data.copy_(conv.bias.detach()[out_idx] if out_idx is not None else conv.bias.detach())
    return new


def slice_bn(bn: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    """A new BN with the channels `idx` of `bn` (affine parameters and running statistics)."""
    new = nn.BatchNorm2d(len(idx), bn.eps, bn.momentum).to(bn.weight.device)
    idx = idx.to(bn.weight.device)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, name).data.copy_(getattr(bn, name).detach()[idx])
    new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def make_small_model(net: nn.Module, kept: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A physically smaller copy of ft_net `net` keeping the filters `kept` ({conv weight name: indices});
    by default the filters that are not exactly zero (conv weight and BN weight and bias). `net` may
    itself be a small model (iterative compression): indices then count its remaining filters."""
    arch = net.arch
    if kept is None:
        kept = kept_filters(net, arch, zero_filters(net, arch))
    small = copy.deepcopy(net)
    for layer in pruner.pruned_convs(arch):  # out- and in-slicing commute: each conv is sliced where it stands
        idx = kept[layer.weight].cpu()
        _set_module(small, layer.conv, slice_conv(small.get_submodule(layer.conv), idx, None))
        _set_module(small, layer.bn, slice_bn(small.get_submodule(layer.bn), idx))
        for consumer in layer.consumers:
            _set_module(small, consumer, slice_conv(small.get_submodule(consumer), None, idx))
    for layer in pruner.pruned_convs(arch):
        if layer.is_block_output:
            block, idx = net.get_submodule(layer.block), kept[layer.weight].cpu()
            if isinstance(block, PrunedBlock):  # shrinking a small model again: indices into the full width
                out_index, width = block.out_index.cpu()[idx], block.width
            else:
                out_index, width = idx, net.get_submodule(layer.conv).out_channels
            _set_module(small, layer.block, PrunedBlock(small.get_submodule(layer.block), out_index, width))
    return small


def is_small_state(state: dict) -> bool:
    return any(k.endswith(".out_index") for k in state)


def load_small_model(path) -> nn.Module:
    """A small model from any checkpoint kind: a small one as saved, a zeroed or full ft_net without its
    all-zero filters. One-line ModelError for a missing or corrupt file."""
    state = model_lib.load_checkpoint(path)
    net = model_from_state_dict(state)
    return net if is_small_state(state) else make_small_model(net)


def small_model_from_state_dict(state: dict) -> nn.Module:
    """Rebuild a small model from its own state dict (arch, class count and kept filters read from it)."""
    arch = model_lib.infer_arch(state)
    full = model_lib.ft_net(model_lib.num_classes(state), arch)
    kept = {}
    for layer in pruner.pruned_convs(arch):
        n = state[layer.weight].shape[0]
        kept[layer.weight] = state[f"{layer.block}.out_index"] if layer.is_block_output else torch.arange(n)
    small = make_small_model(full, kept)
    try:
        small.load_state_dict(state)
    except RuntimeError:
        raise model_lib.ModelError(f"small-model checkpoint does not fit {arch}: {state_dict_mismatch(small, state)}") \
            from None
    return small


# ---------------------------------------------------------------------------------------------------------------
# Deployment shape: what runs fastest, computing exactly the same features


def expand_small_model(small: nn.Module) -> nn.Module:
    """The zeroed full-size ft_net that computes what `small` computes (the inverse of make_small_model;
    inner filters take the first positions of their layer, block outputs their own channels)."""
    arch = small.arch
    full = model_lib.ft_net(small.classifier.classifier[0].out_features, arch).to(next(small.parameters()).device)
    full.train(small.training)
    position = {}
    for layer in pruner.pruned_convs(arch):
        block = small.get_submodule(layer.block) if layer.block else None
        n = small.get_submodule(layer.conv).out_channels
        position[layer.conv] = block.out_index if layer.is_block_output and isinstance(block, PrunedBlock) \
            else torch.arange(n)
    rows = {layer.conv: position[layer.conv] for layer in pruner.pruned_convs(arch)}
    rows.update({layer.bn: position[layer.conv] for layer in pruner.pruned_convs(arch)})
    cols = {c: position[layer.conv] for layer in pruner.pruned_convs(arch) for c in layer.consumers}
    small_state = small.state_dict()
    state = full.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            module, _, name = key.rpartition(".")
            src = small_state.get(key)
            if src is None or src.shape == value.shape or name == "num_batches_tracked":
                if src is not None:
                    value.copy_(src)
                continue
            value.fill_(1.0 if name == "running_var" else 0.0)
            r = rows.get(module, torch.arange(value.shape[0])).to(value.device)
            if value.dim() == 4:
                c = cols.get(module, torch.arange(value.shape[1])).to(value.device)
                value[r[:, None], c] = src
            else:
                value[r] = src
    return full


def deploy_kept(net: nn.Module, kept: dict[str, torch.Tensor], align: int) -> dict[str, torch.Tensor]:
    """`kept` padded for fast kernels: every pruned conv keeps a multiple of `align` filters (zero ones
    fill up; CPU convolution kernels work in blocks of 8 or 16 channels), and a bottleneck's last 1x1
    conv keeps its full width (zero filters instead of a channel scatter: a few more MACs, since its
    input is pruned, but a plain residual add that runtimes fuse into the conv)."""
    modules = dict(net.named_modules())
    out = {}
    for layer in pruner.pruned_convs(net.arch):
        n, idx = modules[layer.conv].out_channels, kept[layer.weight].cpu()
        if layer.is_block_output and net.arch == "resnet50":
            out[layer.weight] = torch.arange(n)
            continue
        target = min(n, -(-len(idx) // align) * align)
        unused = torch.ones(n, dtype=torch.bool)
        unused[idx] = False
        extra = torch.nonzero(unused).squeeze(1)[:target - len(idx)]
        out[layer.weight] = torch.sort(torch.cat([idx, extra])).values
    return out


def make_deploy_model(net: nn.Module, align: int = 8) -> nn.Module:
    """The inference form of a pruned network: a small model with zero filters added where that makes
    it faster (see deploy_kept). `net` is a zeroed ft_net or a small model; features stay the same."""
    zeroed = expand_small_model(net) if any(isinstance(m, PrunedBlock) for m in net.modules()) else net
    kept = kept_filters(zeroed, zeroed.arch, zero_filters(zeroed, zeroed.arch))
    return make_small_model(zeroed, deploy_kept(zeroed, kept, align))  # the added filters are zero ones


# ---------------------------------------------------------------------------------------------------------------
# Cost of a pruned network, counted from kept filter numbers (no model is built)


def conv_output_sizes(net: nn.Module, input_size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Output height and width of every conv of the backbone for one input of `input_size`."""
    sizes, hooks = {}, []
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: sizes.__setitem__(name, out.shape[2:])))
    was_training = net.training
    net.eval()
    with torch.no_grad():
        net.extract(torch.zeros(1, 3, *input_size, device=next(net.parameters()).device))
    net.train(was_training)
    for h in hooks:
        h.remove()
    return {k: tuple(v) for k, v in sizes.items()}


def pruned_cost(net: nn.Module, n_kept: dict[str, int], sizes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(parameters, MACs) of the feature path of `net` with n_kept[conv weight name] filters per pruned conv,
    as the small model would have them (the unused fc and classifier Linear excluded)."""
    layers = {layer.conv: layer for layer in pruner.pruned_convs(net.arch)}
    out_ch = {conv: n_kept.get(f"{conv}.weight", net.get_submodule(conv).out_channels) for conv in layers}
    in_from = {consumer: conv for conv, layer in layers.items() for consumer in layer.consumers}
    bn_of = {layer.bn: layer.conv for layer in layers.values()}
    params = macs = 0
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            o = out_ch.get(name, m.out_channels)
            i = out_ch[in_from[name]] if name in in_from else m.in_channels
            k = m.kernel_size[0] * m.kernel_size[1] * i // m.groups
            params += o * k + (o if m.bias is not None else 0)
            h, w = sizes[name]
            macs += h * w * o * k
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            c = out_ch[bn_of[name]] if name in bn_of else m.num_features
            params += 2 * c
    return params, macs


def small_from_checkpoint(state: dict, nonl1: bool, prune_rate: float | None = None,
                          arch: str | None = None) -> tuple[nn.Module, nn.Module]:
    """(zeroed reference model, small model) for a checkpoint state dict.

    nonl1: a zeroed BAFD/SFP/FPGM checkpoint; its pruned filters are the all-zero ones.
    otherwise (HFP): a full-size checkpoint is pruned by the L1 rule at `prune_rate`; an HFP checkpoint
    that is already small is returned as is (reference and small are then the same model).
    """
    model_lib.check_expected_arch(arch, state, "the checkpoint")
    found = model_lib.infer_arch(state)
    net = model_from_state_dict(state)
    if is_small_state(state):
        return net, net
    if nonl1:
        zeros = zero_filters(net, found)
        if sum(len(v) for v in zeros.values()) == 0:
            raise model_lib.ModelError("--NonL1: the checkpoint has no zero filters (conv weight and BN weight and "
                                       "bias all 0); is it a BAFD/SFP/FPGM net_*.pth? For HFP use --prune_rate")
        return net, make_small_model(net, kept_filters(net, found, zeros))
    if prune_rate is None:
        raise model_lib.ModelError("give --NonL1 for a zeroed BAFD/SFP/FPGM checkpoint, or --prune_rate for HFP")
    mask = pruner.FilterMask(found, pruner.uniform_rates(found, prune_rate), "l1")
    pruned = mask.select(net)
    mask.apply(net, 0.0)
    return net, make_small_model(net, kept_filters(net, found, pruned))


def max_feature_difference(a: nn.Module, b: nn.Module, input_size: tuple[int, int], batch: int = 4) -> float:
    """Largest absolute difference of the two models' features on random images (eval mode)."""
    a.eval(), b.eval()
    device = next(a.parameters()).device
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *input_size, generator=gen).to(device)
    with torch.no_grad():
        return float((a.extract(x) - b.extract(x)).abs().max())


def model_from_state_dict(state: dict) -> nn.Module:
    """An ft_net (arch and class count read from the weights) with `state` loaded; a small model's
    state (see make_small_model) gives the small model."""
    if is_small_state(state):
        return small_model_from_state_dict(state)
    net = model_lib.ft_net(model_lib.num_classes(state), model_lib.infer_arch(state))
    try:
        net.load_state_dict(state)
    except RuntimeError:
        raise model_lib.ModelError(f"checkpoint does not fit {net.arch}: {state_dict_mismatch(net, state)}") from None
    return net
