"""Cost of an SFP-pruned ResNet, two ways: the SFP paper's fractional formula (the numbers its tables
quote) and the MACs of the physically small model, counted by torch.utils.flop_counter."""
from __future__ import annotations

from torch import nn

from classification.models import CIFAR_DEPTHS
from toolkit import utils


def paper_cifar_macs(depth: int, rate: float) -> float:
    """Conv MACs of a CIFAR ResNet as the SFP paper counts them at keep rate `rate` (1 = unpruned).

    Channel counts are fractional (rate * C). A conv whose input is the residual stream counts its pruned
    outputs only (x rate): the stem and the first conv of every block but the network's first; the others
    (each block's second conv, and both convs of the first block, whose input is the pruned stem) count
    pruned inputs and outputs (x rate**2). The classifier is not counted."""
    n = (depth - 2) // 6
    macs = 3 * 16 * 9 * 32 * 32 * rate  # stem
    c_in = 16
    for stage, (width, size) in enumerate(zip((16, 32, 64), (32, 16, 8))):
        for block in range(n):
            first_conv_rate = rate ** 2 if stage == 0 and block == 0 else rate
            macs += c_in * width * 9 * size * size * first_conv_rate
            macs += width * width * 9 * size * size * rate ** 2
            c_in = width
    return macs


def paper_reduction(arch: str, rate: float) -> float | None:
    """The paper's FLOPs reduction (0.422 = 42.2 % fewer) of a CIFAR arch at keep rate; None for ImageNet."""
    if arch not in CIFAR_DEPTHS:
        return None
    return 1 - paper_cifar_macs(CIFAR_DEPTHS[arch], rate) / paper_cifar_macs(CIFAR_DEPTHS[arch], 1)


def params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def macs(net: nn.Module, size: int) -> int:
    """MACs of one forward of a size x size image (torch.utils.flop_counter)."""
    return utils.count_macs(net, (size, size))
