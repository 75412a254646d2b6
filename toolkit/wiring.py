"""How the convs of a ResNet are wired, derived from its modules: for every conv, its BN, its block, the convs
that read its output channels, and its role (stem, inner, block output, downsample). The re-ID pruner
(`pruner.pruned_convs`, ft_net) and the classification package (`classification.models.conv_units`, CIFAR
option-A and torchvision ResNets) both read this one table; the order is the modules' order, which decides
BAFD's tie-breaking and the mask keys.

A block is any module with conv1/bn1 ... convN/bnN (N = 2: basic, 3: bottleneck) and an optional
`downsample` (conv, BN); the stem is conv1/bn1 of the network itself, read through max-pooling (or not) by
the first block's conv1 and downsample conv.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Wire:
    conv: str  # module name, e.g. "model.layer1.0.conv1"
    bn: str
    block: str | None  # "model.layer1.0"; None for the stem
    role: str  # "stem", "inner", "output" (the block's last conv) or "downsample"
    consumers: tuple[str, ...]  # convs whose input channels are this conv's output channels
    kernel_size: tuple[int, ...] = (1, 1)

    @property
    def residual(self) -> bool:
        """Its output enters the residual stream (stem, block output, downsample)."""
        return self.role != "inner"

    @property
    def readers(self) -> tuple[str, ...]:
        return self.consumers


def block_convs(module: nn.Module) -> int:
    """2 for a basic block, 3 for a bottleneck, 0 for anything else."""
    n = 0
    while isinstance(getattr(module, f"conv{n + 1}", None), nn.Conv2d) and \
            isinstance(getattr(module, f"bn{n + 1}", None), nn.BatchNorm2d):
        n += 1
    return n if n >= 2 else 0


def resnet_wiring(net: nn.Module, prefix: str = "") -> list[Wire]:
    """The wiring of a ResNet whose stem is `net.conv1`/`net.bn1`; names get `prefix` (ft_net: "model.")."""
    blocks = [(name, m) for name, m in net.named_modules() if name and block_convs(m)]
    first_name, first = blocks[0]
    stem_readers = (f"{prefix}{first_name}.conv1",) + \
        ((f"{prefix}{first_name}.downsample.0",) if getattr(first, "downsample", None) is not None else ())
    wires = [Wire(f"{prefix}conv1", f"{prefix}bn1", None, "stem", stem_readers, tuple(net.conv1.kernel_size))]
    for name, block in blocks:
        n, full = block_convs(block), f"{prefix}{name}"
        for i in range(1, n + 1):
            last = i == n
            wires.append(Wire(f"{full}.conv{i}", f"{full}.bn{i}", full, "output" if last else "inner",
                              () if last else (f"{full}.conv{i + 1}",),
                              tuple(getattr(block, f"conv{i}").kernel_size)))
        if getattr(block, "downsample", None) is not None:
            wires.append(Wire(f"{full}.downsample.0", f"{full}.downsample.1", full, "downsample", (),
                              tuple(block.downsample[0].kernel_size)))
    return wires
