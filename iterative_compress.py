"""Iterative compression for edge devices: N rounds of prune -> make_small_model -> fine-tune.

    python iterative_compress.py --checkpoint results/ft_resnet18/base/net_last.pth \\
        --data_dir ./datasets/Market/pytorch,./datasets/Duke/pytorch --train_all --test_dir ./datasets/Market/pytorch \\
        --criterion l1 --prune_rate 0.3 --rounds 3 --Epochs 10 --lr 0.01 --loss softmax+circle --warm_epoch 1 \\
        --out results/iter_r18

Each round removes --prune_rate of every pruned conv's REMAINING filters (BAFD: --prune_rate of the
remaining total, allocated over layers as in APFP_train.py), physically shrinks the network, and
fine-tunes the small network with the shared training loop. A round's folder (OUT/round_<k>/) holds
its checkpoint net_last.pth (a small-model state dict, loadable by test.py, test_small.py and
quantize.py) and training log; OUT/metrics.json and the printed table give params, MACs, mAP and
Rank-1 after every round (round 0: the starting model). --resume continues after the last finished
round. Runs in one process (CPU or one GPU).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import nn

import model as model_lib
import pruner
from toolkit import cli, features, train_loop, utils
from toolkit.layouts import DatasetError
from toolkit.surgery import kept_filters, load_small_model, make_small_model


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="the trained starting model: an ft_net, zeroed (BAFD/SFP/FPGM) or small checkpoint")
    p.add_argument("--out", required=True, help="output folder (round_<k>/ per round, metrics.json)")
    p.add_argument("--rounds", type=cli.positive_int, default=3, help="number of prune -> shrink -> fine-tune rounds")
    p.add_argument("--criterion", default="l1", help="which filters a round removes",
                   choices=[name for name, c in pruner.CRITERIA_REGISTRY.items() if c.needs == "weights"])
    p.add_argument("--knn", type=cli.positive_int, default=2, help="BAFD/FPGM neighbourhood size k")
    p.add_argument("--max_lrate", type=cli.prune_fraction, default=0.95,
                   help="BAFD: most a layer may lose in one round")
    p.add_argument("--test_dir", default=None,
                   help="dataset whose query/gallery give the per-round mAP and Rank-1 (default: first --data_dir)")
    train_loop.add_training_args(p, lr=0.01, help_overrides={
        **train_loop.PIPELINE_UNUSED_FLAGS,
        "--prune_rate": "fraction of each layer's remaining filters removed per round",
        "--Epochs": "fine-tuning epochs per round", "--resume": "carry on after the last finished round in --out",
        "--overwrite": "start again in an --out folder that already holds rounds, replacing them"})
    p.set_defaults(Epochs=10, milestones="", save_epoch=10 ** 9, prune_rate=0.3)
    return p


def round_rates(net: nn.Module, args: argparse.Namespace) -> dict[str, float]:
    if args.criterion == "bafd":
        return pruner.bafd_layer_rates(net, net.arch, args.prune_rate, args.max_lrate, args.knn)
    return pruner.uniform_rates(net.arch, args.prune_rate)


def prune_and_shrink(net: nn.Module, args: argparse.Namespace) -> nn.Module:
    """A physically smaller copy of `net` without the filters the criterion selects this round."""
    selected = pruner.select_layers(net, round_rates(net, args), args.criterion, args.knn, efficient=True)
    return make_small_model(net, kept_filters(net, net.arch, selected))


def measure(net: nn.Module, args: argparse.Namespace, device: torch.device) -> dict:
    """Params, MACs, mAP and Rank-1 of `net` on the test dataset."""
    size = (args.height, args.width)
    net = net.to(device)
    accuracy = features.reid_accuracy(lambda images: features.extract_features(net, images, device, 128, args.workers),
                                      args.test_dir or args.data_dir.split(",")[0], size)
    return {"params": model_lib.inference_params(net), "macs": utils.count_macs(net, size), **accuracy}


def finetune(small: nn.Module, args: argparse.Namespace, out: Path) -> nn.Module:
    """Train the small network with the shared loop for args.Epochs epochs in `out`."""
    round_args = argparse.Namespace(**vars(args))
    # a round folder left by an interrupted round is redone from its start
    round_args.network_arch, round_args.out_dir, round_args.resume, round_args.overwrite = small.arch, str(out), \
        False, True
    return train_loop.train(round_args, build_model=lambda a, n: train_loop.fit_classifier(copy.deepcopy(small), n),
                            method=f"iterative-{args.criterion}")


def format_rounds(rounds: list[dict]) -> str:
    lines = [f"{'round':>5s} {'params (M)':>10s} {'GMACs':>8s} {'mAP':>6s} {'R1':>6s}"]
    lines += [f"{r['round']:5d} {r['params'] / 1e6:10.3f} {r['macs'] / 1e9:8.4f} {r['mAP']:6.3f} {r['R1']:6.3f}"
              for r in rounds]
    return "\n".join(lines)


def read_rounds(metrics_file: Path) -> list[dict]:
    try:
        rounds = json.loads(metrics_file.read_text())
        if rounds and all(isinstance(r, dict) and {"round", "checkpoint"} <= r.keys() for r in rounds):
            return rounds
    except (ValueError, OSError):
        pass
    raise train_loop.TrainingError(f"--resume: {metrics_file} is corrupt or truncated; pass --overwrite to start again")


def main(args: argparse.Namespace) -> list[dict]:
    pruner.check_rate(args.prune_rate, "--prune_rate")
    out = Path(args.out)
    metrics_file = out / "metrics.json"
    device = utils.select_device(args.gpu_ids)
    cli.refuse_existing_output(out, args.overwrite, args.resume, "carry on after its last finished round")
    if args.resume and metrics_file.is_file():
        rounds = read_rounds(metrics_file)
        net = load_small_model(rounds[-1]["checkpoint"])  # round 0's is --checkpoint
        print(f"resuming {out} after round {rounds[-1]['round']}")
    else:
        net, rounds = load_small_model(args.checkpoint), []
        rounds.append({"round": 0, **measure(net, args, device), "checkpoint": str(args.checkpoint)})
        utils.write_text_atomic(json.dumps(rounds, indent=2), metrics_file)
    for k in range(rounds[-1]["round"] + 1, args.rounds + 1):
        small = prune_and_shrink(net.cpu(), args)
        net = finetune(small, args, out / f"round_{k}")
        rounds.append({"round": k, **measure(net, args, device),
                       "checkpoint": str(out / f"round_{k}" / "net_last.pth")})
        utils.write_text_atomic(json.dumps(rounds, indent=2), metrics_file)
        print(format_rounds(rounds), flush=True)
    print(f"wrote {metrics_file}")
    return rounds


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args(), train_loop.USER_ERRORS + (pruner.PruneError, DatasetError))
