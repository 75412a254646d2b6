"""ft_net: a torchvision ResNet backbone + BN-neck head for re-ID.

State-dict keys match the reference (`model.layer1.0.conv1.weight`, `classifier.add_block.0.weight`,
`classifier.classifier.0.weight`, ...), so released checkpoints load.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
import torchvision
from torch import nn

from toolkit.errors import UserError
from toolkit.run import check_finite_state

ARCHS = ("resnet18", "resnet34", "resnet50")
FEATURE_DIM = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
IMAGENET_WEIGHTS = {"resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
                    "resnet34": torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
                    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
                    "resnet101": torchvision.models.ResNet101_Weights.IMAGENET1K_V1,  # classification/ only
                    "resnet152": torchvision.models.ResNet152_Weights.IMAGENET1K_V1}


class ModelError(UserError):
    """A user-facing problem loading a model or its weights; printed as one line."""


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ModelError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return arch


def imagenet_cache_path(arch: str) -> Path:
    """Where torchvision's weights API keeps the ImageNet weights of `arch` (never downloaded here)."""
    if arch not in IMAGENET_WEIGHTS:
        raise ModelError(f"no ImageNet weights for {arch!r}; choose one of {', '.join(IMAGENET_WEIGHTS)}")
    url = IMAGENET_WEIGHTS[arch].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_imagenet_state(arch: str, path: str | os.PathLike | None = None) -> dict:
    """ImageNet state dict for a torchvision ResNet, from `path` or torchvision's local cache."""
    source = Path(path) if path else imagenet_cache_path(arch)
    if not source.is_file():
        hint = "" if path else f" (looked in torchvision's cache {source})"
        raise ModelError(f"ImageNet weights for {arch} not found{hint}: pass --pretrained PATH to a torchvision "
                         f"{arch} state dict, or --no_pretrained to train from scratch")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file
        raise ModelError(f"cannot read ImageNet weights {source}: {e}") from None


class ClassBlock(nn.Module):
    """BN neck (`add_block`) and a Linear classifier kept for checkpoint-key compatibility."""

    def __init__(self, input_dim: int, class_num: int):
        super().__init__()
        self.add_block = nn.Sequential(nn.BatchNorm1d(input_dim))
        nn.init.normal_(self.add_block[0].weight, 1.0, 0.02)
        nn.init.zeros_(self.add_block[0].bias)
        self.classifier = nn.Sequential(nn.Linear(input_dim, class_num))
        nn.init.normal_(self.classifier[0].weight, std=0.001)
        nn.init.zeros_(self.classifier[0].bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.add_block(x)
        f = x / (x.norm(p=2, dim=1, keepdim=True) + 1e-8)
        return self.classifier(x), f


class ft_net(nn.Module):  # noqa: N801 (reference name)
    """forward(x) -> (logits, f) with f the L2-normalised BN-neck feature."""

    def __init__(self, class_num: int, arch: str = "resnet50", pretrained: bool | str | os.PathLike = False):
        super().__init__()
        check_arch(arch)
        backbone = getattr(torchvision.models, arch)(weights=None)
        if pretrained:
            backbone.load_state_dict(load_imagenet_state(arch, None if pretrained is True else pretrained))
        backbone.avgpool = nn.AdaptiveAvgPool2d(1)
        self.arch = arch
        self.model = backbone
        self.classifier = ClassBlock(FEATURE_DIM[arch], class_num)

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
        return torch.flatten(m.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier(self.backbone_features(x))

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """The re-ID feature alone (the classifier Linear is not needed at test time)."""
        x = self.classifier.add_block(self.backbone_features(x))
        return x / (x.norm(p=2, dim=1, keepdim=True) + 1e-8)


def infer_arch(state_dict: dict) -> str:
    """The ResNet depth a reference-style state dict was saved from."""
    if "model.layer1.0.conv3.weight" in state_dict:
        return "resnet50"
    blocks = {k.split(".")[2] for k in state_dict if k.startswith("model.layer3.")}
    return "resnet34" if len(blocks) == 6 else "resnet18"


def check_expected_arch(expected: str | None, state: dict, source: str | os.PathLike) -> None:
    """--network_arch, when given, must name the arch the checkpoint holds (the arch itself is always read
    from the weights)."""
    if expected is not None and check_arch(expected) != infer_arch(state):
        raise ModelError(f"--network_arch {expected} does not match {source}, which holds a {infer_arch(state)}")


def num_classes(state_dict: dict) -> int:
    return state_dict["classifier.classifier.0.weight"].shape[0]


def load_checkpoint(path: str | os.PathLike, required_key: str | None = "classifier.classifier.0.weight",
                    kind: str = "an ft_net state dict", what: str = "checkpoint") -> dict:
    """A checkpoint dict (by default an ft_net state dict; required_key None: any dict), loaded safely
    (weights only); one-line errors, naming the file as `what`, for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what} {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's text advises weights_only=False: never repeated here
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise ModelError(f"{what} {path} pickles Python objects ({found.group(1)}; the SFP CIFAR code saves whole "
                             "models so): only tensors and plain values are loaded, nothing in it ran") from None
        raise ModelError(f"{what} {path} is corrupt or not a state dict (not a file of tensors and plain "
                         "values)") from None
    except Exception as e:
        if "PytorchStreamReader" in str(e) or isinstance(e, EOFError):
            raise ModelError(f"{what} {path} is truncated or corrupt (not a complete torch.save file)") from None
        raise ModelError(f"{what} {path} is corrupt or not a state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if not isinstance(state, dict) or (required_key is not None and required_key not in state):
        raise ModelError(f"{what} {path} is not {kind}")
    check_finite_state(state, f"{what} {path}")  # NaN weights would be scored, shrunk or trained on silently
    return state


def inference_params(net: nn.Module) -> int:
    """Parameters used to compute the re-ID feature (the unused fc and classifier Linear excluded); a
    model that knows its own count (`feature_params`, e.g. a TransReID ViT) is asked."""
    if hasattr(net, "feature_params"):
        return net.feature_params()
    return sum(p.numel() for n, p in net.named_parameters()
               if not n.startswith(("model.fc.", "classifier.classifier.")))
