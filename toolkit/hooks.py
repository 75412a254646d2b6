"""What each train script plugs into the shared loop, read from one methods table (`METHODS`): the
epoch-end masks of BAFD, SFP, FPGM and Taylor, and HFP's physically smaller starting model."""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

import pruner
from toolkit import cli, data, distributed, surgery, train_loop
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

    def __init__(self, mask: pruner.FilterMask, decay: float, meter: CostMeter,
                 scores: Callable[[nn.Module, int], dict[str, torch.Tensor]] | None = None):
        self.mask, self.decay, self.meter, self.scores = mask, decay, meter, scores

    def on_epoch_end(self, net: nn.Module, epoch: int, last: bool) -> str:
        scores = self.scores(net, epoch) if self.scores else None
        self.mask.select(net, scores)
        self.mask.apply(net, self.decay)
        if last and self.decay != 0:
            self.mask.select(net, scores)
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


@dataclass(frozen=True)
class Method:
    """One pruning method of the train scripts.

    criterion: a name of pruner.CRITERIA_REGISTRY (which filters);
    rates: "bafd" (allocated per layer from the initial weights) or "uniform" (--prune_rate in every layer);
    decay: what the selected filters are multiplied by at every epoch end: 0 (zeroed), "--decay_rate" (that
        flag), or None (removed physically once, before training);
    checkpoint: "zeroed" (full size with zero filters: test_small.py --NonL1 removes them) or "small"
        (physically small from the start)."""
    criterion: str
    rates: str
    decay: float | str | None
    checkpoint: str


METHODS = {
    "bafd": Method("bafd", "bafd", "--decay_rate", "zeroed"),
    "sfp": Method("l2", "uniform", 0.0, "zeroed"),
    "fpgm": Method("fpgm", "uniform", 0.0, "zeroed"),
    "taylor": Method("taylor", "uniform", 0.0, "zeroed"),
    "hfp": Method("l1", "uniform", None, "small"),
}


def method_hook(name: str) -> Callable[[nn.Module, argparse.Namespace], MaskHook]:
    """The epoch-end hook of a masking method of METHODS."""
    method = METHODS[name]

    def make(net: nn.Module, args: argparse.Namespace) -> MaskHook:
        arch = args.network_arch
        if method.rates == "bafd":
            rates = pruner.bafd_layer_rates(net, arch, args.prune_rate, args.max_lrate, args.knn)
        else:
            rates = pruner.uniform_rates(arch, args.prune_rate)
        decay = getattr(args, method.decay.lstrip("-")) if isinstance(method.decay, str) else method.decay
        needs = pruner.check_criterion(method.criterion).needs
        scores = TaylorScores(args, args.taylor_batches) if needs == "taylor" else None
        mask = pruner.FilterMask(arch, rates, method.criterion, getattr(args, "knn", 2),
                                 getattr(args, "efficient_pruning", False))
        return MaskHook(mask, decay, CostMeter(net, (args.height, args.width)), scores)
    return make


def train_method(args: argparse.Namespace, name: str) -> nn.Module:
    """Train one run of METHODS[name] with the shared loop; opts.yaml records the method's row."""
    method = METHODS[name]
    if method.decay is None:
        return train_loop.train(args, build_model=hfp_model, method=name, method_row=asdict(method))
    return train_loop.train(args, make_hook=method_hook(name), method=name, method_row=asdict(method))


bafd_hook = method_hook("bafd")


class TaylorScores:
    """First-order Taylor importance of every pruned conv's filters (Molchanov et al.): on `batches` training
    batches (a forward and backward pass each, no optimiser step, BN statistics untouched), per forward
    pass of a conv the |sum over images and positions of activation x gradient| of each output channel,
    summed over the passes. The draws are seeded by the epoch and leave the training's random streams alone."""

    def __init__(self, args: argparse.Namespace, batches: int):
        self.args, self.batches = args, batches
        self.loader = data.train_loader(data.training_dirs(args.data_dir, args.train_all), args.batchsize,
                                        (args.height, args.width), 0, args.erasing_p, args.color_jitter,
                                        seed=args.seed + 7919)

    def __call__(self, net: nn.Module, epoch: int) -> dict[str, torch.Tensor]:
        convs = {layer.weight: net.get_submodule(layer.conv) for layer in pruner.pruned_convs(self.args.network_arch)}
        device = next(net.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.args.seed + epoch)
            self.loader.sampler.set_epoch(epoch)
            return taylor_scores(net, convs, self.first_batches(), self.loss_fn(epoch))

    def first_batches(self):
        """The first `batches` batches of the loader's current epoch."""
        for i, batch in enumerate(self.loader):
            if i == self.batches:
                return
            yield batch

    def loss_fn(self, epoch: int) -> Callable:
        generator = torch.Generator().manual_seed(self.args.seed + epoch)  # the hard-negative pool draws

        def loss(net: nn.Module, imgs: torch.Tensor, labels: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
            return train_loop.batch_loss(train_loop.PairForward(net), imgs, labels, positives, self.args, generator)[0]
        return loss


def taylor_scores(net: nn.Module, convs: dict[str, nn.Module], batches, loss_fn: Callable) -> dict[str, torch.Tensor]:
    """{conv weight name: per-filter sum over forward passes of |sum_(n,h,w) a * dL/da|}, a = the conv's output."""
    scores = {name: torch.zeros(conv.out_channels, dtype=torch.float64) for name, conv in convs.items()}

    def keep(name: str):
        def forward_hook(module, inputs, output):
            if not output.requires_grad:
                return

            def add(grad: torch.Tensor) -> None:  # returns None: the gradient itself is left as it is
                scores[name].add_((output.detach() * grad).sum((0, 2, 3)).abs().double().cpu())
            output.register_hook(add)
        return forward_hook

    handles = [conv.register_forward_hook(keep(name)) for name, conv in convs.items()]
    was_training = net.training
    net.eval()  # BN uses (and keeps) its running statistics
    device = next(net.parameters()).device
    try:
        for imgs, labels, positives in batches:
            loss = loss_fn(net, imgs.to(device), labels.to(device), positives.to(device).flatten(0, 1))
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        net.zero_grad(set_to_none=True)
        net.train(was_training)
    return scores


def hfp_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """HFP: rank filters by L1 norm once on the initial weights and remove the smallest physically."""
    net = train_loop.default_model(args, num_classes)
    pruned = pruner.select_layers(net, pruner.uniform_rates(args.network_arch, args.prune_rate),
                                  METHODS["hfp"].criterion)
    meter = CostMeter(net, (args.height, args.width))
    if distributed.is_main():
        print("HFP: " + meter.note(pruned))
    return surgery.make_small_model(net, surgery.kept_filters(net, args.network_arch, pruned))


USER_ERRORS = (pruner.PruneError,) + train_loop.USER_ERRORS
