"""The networks of the SFP paper: CIFAR ResNet-20/32/44/56/110 (option-A shortcuts) and torchvision's
ImageNet ResNet-18/34/50/101/152, plus the conv -> BN -> readers table that pruning and the small model
read (the one place that knows how these networks are wired).

CIFAR modules are named like torchvision's (conv1, bn1, layer1.0.conv1, ..., fc), and their parameters
come in the same order as the SFP code's, so its parameter indices (--layer_begin/--layer_end) point at
the same convs.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torchvision
from torch import nn

import model as reid_model
from toolkit.wiring import Wire, resnet_wiring

CIFAR_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
IMAGENET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class ModelError(reid_model.ModelError):
    """An unknown arch, or weights that do not fit; printed as one line."""


class ShortcutA(nn.Module):
    """Option A: subsample by 2 and append zero channels after the identity ones (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return torch.cat([x, x.new_zeros(x.shape[0], self.extra_channels, *x.shape[2:])], 1)


class CifarBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = ShortcutA(planes - in_planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem 3->16, three stages of (depth-2)/6 basic blocks (16/32/64 channels), 8x8 average pool, FC."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ModelError(f"a CIFAR ResNet has depth 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        planes = 16
        for stage, width in enumerate((16, 32, 64), 1):
            blocks = []
            for i in range(n):
                blocks.append(CifarBasicBlock(planes, width, 2 if stage > 1 and i == 0 else 1))
                planes = width
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                m.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def check_arch(arch: str) -> str:
    if arch not in CIFAR_DEPTHS and arch not in IMAGENET_ARCHS:
        raise ModelError(f"unknown arch {arch!r}; choose one of {', '.join([*CIFAR_DEPTHS, *IMAGENET_ARCHS])}")
    return arch


def build_model(arch: str, num_classes: int, pretrained: bool | str = False) -> nn.Module:
    """A CIFAR or ImageNet ResNet. pretrained (ImageNet archs): True = torchvision's local cache, or a
    file path; nothing is downloaded."""
    check_arch(arch)
    if arch in CIFAR_DEPTHS:
        if pretrained:
            raise ModelError("--use_pretrain is for the ImageNet ResNets (there are no CIFAR ImageNet weights)")
        net = CifarResNet(CIFAR_DEPTHS[arch], num_classes)
        net.arch = arch
        return net
    net = getattr(torchvision.models, arch)(num_classes=num_classes)
    net.arch = arch  # named in messages
    if pretrained:
        state = reid_model.load_imagenet_state(arch, None if pretrained is True else Path(pretrained))
        if num_classes != 1000:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("fc.") for k in missing):
            raise ModelError(f"the ImageNet weights do not fit {arch}")
    return net


ConvUnit = Wire  # conv, bn, readers (its consumers), residual: the one wiring table's entry


def conv_units(net: nn.Module) -> list[Wire]:
    """Every conv of a CIFAR or torchvision ResNet with its BN and readers, in parameter order."""
    return resnet_wiring(net)
