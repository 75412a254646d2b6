"""The one wiring table (toolkit.wiring), derived from module types, against the two hand-written tables it
replaced: pruner.pruned_convs (ft_net) and classification.models.conv_units (CIFAR and torchvision ResNets).
Order, names, BNs, consumers, roles and BAFD's rate tying must all be the same."""
import pytest
import torch

import model as model_lib
import pruner
from classification.models import CIFAR_DEPTHS, IMAGENET_ARCHS, build_model, conv_units

LEGACY_BLOCKS = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3], "resnet50": [3, 4, 6, 3]}


def legacy_pruned_convs(arch: str) -> list[tuple]:
    """pruner.pruned_convs as it was written by hand: (conv, bn, block, is_block_output, ranked, consumers)."""
    bottleneck = arch == "resnet50"
    layers = []
    if bottleneck:
        layers.append(("model.conv1", "model.bn1", None, False, True,
                       ("model.layer1.0.conv1", "model.layer1.0.downsample.0")))
    n_convs = 3 if bottleneck else 2
    for li, n_blocks in enumerate(LEGACY_BLOCKS[arch], 1):
        for bi in range(n_blocks):
            block = f"model.layer{li}.{bi}"
            for ci in range(1, n_convs + 1):
                is_output = ci == n_convs
                consumers = () if is_output else (f"{block}.conv{ci + 1}",)
                ranked = (ci == 2) if bottleneck else True
                layers.append((f"{block}.conv{ci}", f"{block}.bn{ci}", block, is_output, ranked, consumers))
    return layers


def legacy_conv_units(net) -> list[tuple]:
    """classification.models.conv_units as it was written by hand: (conv, bn, readers, residual)."""
    import torchvision

    from classification.models import CifarBasicBlock
    first = net.layer1[0]
    stem_readers = ("layer1.0.conv1",) + (("layer1.0.downsample.0",) if getattr(first, "downsample", None)
                                          is not None else ())
    units = [("conv1", "bn1", stem_readers, True)]
    for name, block in net.named_modules():
        if isinstance(block, torchvision.models.resnet.Bottleneck):
            units += [(f"{name}.conv1", f"{name}.bn1", (f"{name}.conv2",), False),
                      (f"{name}.conv2", f"{name}.bn2", (f"{name}.conv3",), False),
                      (f"{name}.conv3", f"{name}.bn3", (), True)]
        elif isinstance(block, (torchvision.models.resnet.BasicBlock, CifarBasicBlock)):
            units += [(f"{name}.conv1", f"{name}.bn1", (f"{name}.conv2",), False),
                      (f"{name}.conv2", f"{name}.bn2", (), True)]
        else:
            continue
        if getattr(block, "downsample", None) is not None:
            units.append((f"{name}.downsample.0", f"{name}.downsample.1", (), True))
    return units


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_reid_table_equals_the_hand_written_one(arch):
    derived = [(c.conv, c.bn, c.block, c.is_block_output, c.ranked, c.consumers) for c in pruner.pruned_convs(arch)]
    assert derived == legacy_pruned_convs(arch)
    net = model_lib.ft_net(5, arch)  # every name is a real module of the network the table describes
    for c in pruner.pruned_convs(arch):
        assert isinstance(net.get_submodule(c.conv), torch.nn.Conv2d)
        assert net.get_submodule(c.bn).num_features == net.get_submodule(c.conv).out_channels
        for consumer in c.consumers:
            assert net.get_submodule(consumer).in_channels == net.get_submodule(c.conv).out_channels


@pytest.mark.parametrize("arch", list(CIFAR_DEPTHS) + list(IMAGENET_ARCHS))
def test_classification_table_equals_the_hand_written_one(arch):
    with torch.device("meta"):
        net = build_model(arch, 10)
    assert [(u.conv, u.bn, u.readers, u.residual) for u in conv_units(net)] == legacy_conv_units(net)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_rate_tying_in_a_block_is_unchanged(arch):
    layers = pruner.pruned_convs(arch)
    rates = {c.weight: 0.1 * (i % 7) for i, c in enumerate(layers)}
    tied = pruner.equalise_block_rates(arch, rates)
    for c in layers:
        if c.block is None:
            assert tied[c.weight] == rates[c.weight]
            continue
        block = [d for d in layers if d.block == c.block]
        expected = rates[block[1].weight] if arch == "resnet50" else (rates[block[0].weight]
                                                                       + rates[block[1].weight]) / 2
        assert tied[c.weight] == expected


def test_default_layer_end_is_the_sfp_codes_table():
    from classification.sfp import last_conv_index
    sfp_readme = {"resnet18": 57, "resnet34": 105, "resnet50": 156, "resnet101": 309, "resnet152": 462,
                  "resnet20": 54, "resnet32": 90, "resnet56": 162, "resnet110": 324}
    assert {arch: last_conv_index(arch) for arch in sfp_readme} == sfp_readme
