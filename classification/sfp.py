"""Soft filter pruning as the SFP paper does it: which convs, which filters, and the zeroing.

The SFP code names layers by their index in `model.parameters()` (--layer_begin/--layer_end/
--layer_inter, end inclusive). `pruned_layers` translates those indices into conv names once; from
there on everything speaks of modules. Filters are ranked by pruner.select_filters' L2 criterion.
"""
from __future__ import annotations

import torch
from torch import nn

import pruner
from classification.models import ModelError, build_model, conv_units


def pruned_layers(net: nn.Module, layer_begin: int, layer_end: int, layer_inter: int,
                  skip_downsample: bool = True) -> list[str]:
    """Conv names of the parameter indices layer_begin..layer_end (inclusive) step layer_inter.

    Every index must be a conv weight (a wrong index is an error); downsample convs are left out when
    skip_downsample (the SFP ImageNet default)."""
    if layer_inter < 1 or layer_begin < 0 or layer_end < layer_begin:
        raise ModelError(f"--layer_begin {layer_begin} --layer_end {layer_end} --layer_inter {layer_inter} "
                         "selects no layer")
    names = [name for name, _ in net.named_parameters()]
    convs = {f"{u.conv}.weight": u for u in conv_units(net)}
    layers = []
    for index in range(layer_begin, layer_end + 1, layer_inter):
        if index >= len(names):
            raise ModelError(f"--layer_end {layer_end}: the model has only {len(names)} parameters "
                             f"(indices 0..{len(names) - 1})")
        if names[index] not in convs:
            raise ModelError(f"parameter index {index} is {names[index]}, not a conv weight: check --layer_begin/"
                             "--layer_end/--layer_inter (conv weights are every 3rd index from 0)")
        if not (skip_downsample and ".downsample." in names[index]):
            layers.append(convs[names[index]].conv)
    return layers


def last_conv_index(arch: str) -> int:
    """The parameter index of an arch's last conv weight: the default --layer_end (every conv, stem
    included; ImageNet resnet18 57, resnet50 156, CIFAR resnet20 54, resnet56 162)."""
    with torch.device("meta"):
        net = build_model(arch, 10)
    names = [name for name, _ in net.named_parameters()]
    return max(names.index(f"{u.conv}.weight") for u in conv_units(net))


def n_pruned(filters: int, rate: float) -> int:
    """Filters zeroed in a conv of `filters` at KEEP rate `rate`: int(N * (1 - rate)), as in SFP."""
    return int(filters * (1 - rate))


class SoftFilterMask:
    """Zero the smallest-L2 filters of each selected conv (and with prune_bn their BN weight and bias).

    Soft: no gradient is masked, so zeroed filters keep training and can come back; the selection is made
    anew from the current norms every time `step` is called."""

    def __init__(self, layers: list[str], rate: float, prune_bn: bool = False):
        if not 0 < rate <= 1:
            raise ModelError(f"--rate is the fraction of filters KEPT, in (0, 1]; got {rate}")
        self.layers, self.rate, self.prune_bn = list(layers), rate, prune_bn

    def select(self, net: nn.Module) -> dict[str, torch.Tensor]:
        """{conv name: sorted indices of the filters to zero}, from the current weights."""
        selected = {}
        for name in self.layers:
            weight = net.get_submodule(name).weight
            selected[name] = pruner.select_filters(weight, n_pruned(weight.shape[0], self.rate), "l2")
        return selected

    @torch.no_grad()
    def step(self, net: nn.Module) -> dict[str, torch.Tensor]:
        """Select and zero; returns the selection."""
        selected = self.select(net)
        bns = {u.conv: u.bn for u in conv_units(net)}
        for name, idx in selected.items():
            idx = idx.to(net.get_submodule(name).weight.device)
            net.get_submodule(name).weight[idx] = 0
            if self.prune_bn:
                bn = net.get_submodule(bns[name])
                bn.weight[idx] = 0
                bn.bias[idx] = 0
        return selected
