"""What each train script plugs into the shared loop: the epoch-end masks of BAFD, SFP and FPGM,
and HFP's physically smaller starting model."""
from __future__ import annotations

import argparse

import torch
from torch import nn

import pruner
from toolkit import cli, distributed, surgery, train_loop
from toolkit.train_loop import EpochEndHook


class CostMeter:
    """Parameters and MACs of the network as its small model would have them, relative to the full one."""

    def __init__(self, net: nn.Module, input_size: tuple[int, int]):
        self.net = net
        self.sizes = surgery.conv_output_sizes(net, input_size)
        self.full = surgery.pruned_cost(net, {}, self.sizes)

    def note(self, pruned: dict[str, torch.Tensor]) -> str:
        widths = {name: self.net.get_submodule(name.rsplit(".", 1)[0]).out_channels for name in pruned}
        total, n_pruned = sum(widths.values()), sum(len(idx) for idx in pruned.values())
        kept = {name: widths[name] - len(idx) for name, idx in pruned.items()}
        params, macs = surgery.pruned_cost(self.net, kept, self.sizes)
        return (f"pruned {n_pruned}/{total} filters ({n_pruned / max(total, 1):.1%}), "
                f"params {params / self.full[0]:.1%} MACs {macs / self.full[1]:.1%} remaining")


class MaskHook(EpochEndHook):
    """Select on the current weights at every epoch end and scale the selection by `decay`.

    decay = 0 (SFP, FPGM): the selection is zeroed, and the model itself is what gets saved.
    decay > 0 (BAFD): the selection decays; saved copies have a fresh selection set to exactly 0, and
    after the last epoch the model itself is hard-zeroed.
    """

    def __init__(self, mask: pruner.FilterMask, decay: float, meter: CostMeter):
        self.mask, self.decay, self.meter = mask, decay, meter

    def on_epoch_end(self, net: nn.Module, epoch: int, last: bool) -> str:
        self.mask.select(net)
        self.mask.apply(net, self.decay)
        if last and self.decay != 0:
            self.mask.select(net)
            self.mask.apply(net, 0.0)
        return self.meter.note(self.mask.selected)

    def weights_to_save(self, net: nn.Module, epoch: int, last: bool) -> dict:
        if self.decay == 0 or last:
            return net.state_dict()
        return self.mask.zeroed_state(net)

    def state_dict(self) -> dict:
        return self.mask.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.mask.load_state_dict(state)


def add_pruning_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """BAFD's own flags (APFP_train.py)."""
    parser.add_argument("--knn", type=cli.positive_int, default=2,
                        help="local power = sum of the k smallest distances (self included): 2 = nearest other")
    parser.add_argument("--max_lrate", type=cli.prune_fraction, default=0.95,
                        help="largest prune rate any one layer gets")
    parser.add_argument("--decay_rate", type=cli.probability, default=0.3,
                        help="selected filters (conv weight, BN weight and bias) are multiplied by this each epoch")
    parser.add_argument("--efficient_pruning", action="store_true",
                        help="for layers with rate > 0.5, greedily build the (smaller) keep set instead")
    return parser


def bafd_hook(net: nn.Module, args: argparse.Namespace) -> MaskHook:
    rates = pruner.bafd_layer_rates(net, args.network_arch, args.prune_rate, args.max_lrate, args.knn)
    mask = pruner.FilterMask(args.network_arch, rates, "bafd", args.knn, args.efficient_pruning)
    return MaskHook(mask, args.decay_rate, CostMeter(net, (args.height, args.width)))


def uniform_hook(criterion: str):
    """SFP (l2) / FPGM (fpgm): the same rate for every pruned conv, zeroed at every epoch end."""
    def make(net: nn.Module, args: argparse.Namespace) -> MaskHook:
        mask = pruner.FilterMask(args.network_arch, pruner.uniform_rates(args.network_arch, args.prune_rate), criterion)
        return MaskHook(mask, 0.0, CostMeter(net, (args.height, args.width)))
    return make


def hfp_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """HFP: rank filters by L1 norm once on the initial weights and remove the smallest physically."""
    net = train_loop.default_model(args, num_classes)
    pruned = pruner.select_layers(net, pruner.uniform_rates(args.network_arch, args.prune_rate), "l1")
    meter = CostMeter(net, (args.height, args.width))
    if distributed.is_main():
        print("HFP: " + meter.note(pruned))
    return surgery.make_small_model(net, surgery.kept_filters(net, args.network_arch, pruned))


USER_ERRORS = (pruner.PruneError,) + train_loop.USER_ERRORS
