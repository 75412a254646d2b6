"""SFP on CIFAR-10 ResNets, with the SFP code's command line.

    python -m classification.pruning_cifar10_resnet ./data/cifar.python --dataset cifar10 --arch resnet56 \\
        --save_path ./logs/cifar10_resnet56_rate0.6 --epochs 200 --schedule 1 60 120 160 \\
        --gammas 10 0.2 0.2 0.2 --learning_rate 0.01 --decay 0.0005 --batch_size 128 --rate 0.6 \\
        --layer_begin 0 --layer_end 162 --layer_inter 3 --epoch_prune 1

--rate is the fraction of filters KEPT. layer_end per arch: resnet20 54, resnet32 90, resnet56 162,
resnet110 324 (every conv, stem included). --rate 1 trains the unpruned baseline.
"""
import argparse

from classification import engine
from classification.models import CIFAR_DEPTHS
from classification.sfp import last_conv_index
from toolkit import cli, utils


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_path", help="folder holding cifar-10-batches-py/ (the python version of CIFAR-10)")
    p.add_argument("--dataset", choices=["cifar10"], default="cifar10", help="only CIFAR-10 is supported")
    p.add_argument("--arch", choices=list(CIFAR_DEPTHS), default="resnet110", help="CIFAR ResNet depth")
    p.add_argument("--save_path", default="./logs/cifar10", help="folder for checkpoints, log.csv, metrics.json")
    p.add_argument("--epochs", type=cli.positive_int, default=200, help="training epochs")
    p.add_argument("--batch_size", type=cli.positive_int, default=128, help="images per step")
    p.add_argument("--learning_rate", type=cli.positive_float, default=0.01, help="initial learning rate")
    p.add_argument("--momentum", type=cli.probability, default=0.9, help="SGD (Nesterov) momentum")
    p.add_argument("--decay", type=cli.nonnegative_float, default=0.0005, help="weight decay")
    p.add_argument("--schedule", type=cli.nonnegative_int, nargs="*", default=[1, 60, 120, 160],
                   help="0-based epochs at which the learning rate is multiplied by the matching --gammas")
    p.add_argument("--gammas", type=cli.positive_float, nargs="*", default=[10, 0.2, 0.2, 0.2],
                   help="learning-rate factors, one per --schedule epoch")
    p.add_argument("--rate", type=cli.keep_fraction, default=0.9, help="fraction of filters KEPT (0.7 prunes 30%%)")
    p.add_argument("--layer_begin", type=cli.nonnegative_int, default=0, help="first parameter index pruned")
    p.add_argument("--layer_end", type=cli.nonnegative_int, default=None,
                   help="last parameter index pruned, inclusive (default: the arch's last conv)")
    p.add_argument("--layer_inter", type=cli.positive_int, default=3, help="parameter-index step (3: every conv)")
    p.add_argument("--epoch_prune", type=cli.positive_int, default=1, help="re-select and zero every N epochs")
    p.add_argument("--use_pretrain", action="store_true", help="start from --pretrain_path (a trained model)")
    p.add_argument("--pretrain_path", default=None, help="checkpoint to start from with --use_pretrain")
    p.add_argument("--resume", default=None, help="continue this checkpoint.pth (with -e: evaluate it)")
    p.add_argument("-e", "--evaluate", action="store_true", help="only evaluate --resume (the model with zeros)")
    p.add_argument("--workers", type=cli.nonnegative_int, default=2, help="data-loading worker processes")
    p.add_argument("--manualSeed", type=cli.nonnegative_int, default=0, help="random seed")
    engine.add_device_args(p)
    return p


def recipe(args: argparse.Namespace) -> engine.Recipe:
    if args.use_pretrain and not args.pretrain_path:
        raise cli.UsageError("--use_pretrain needs --pretrain_path CHECKPOINT")
    return engine.Recipe(
        data=args.data_path, arch=args.arch, save_dir=args.save_path, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.learning_rate, momentum=args.momentum, weight_decay=args.decay,
        nesterov=True, workers=args.workers, seed=args.manualSeed, schedule=args.schedule, gammas=args.gammas,
        prune=args.rate < 1, rate=args.rate, layer_begin=args.layer_begin,
        layer_end=args.layer_end if args.layer_end is not None else last_conv_index(args.arch),
        layer_inter=args.layer_inter, epoch_prune=args.epoch_prune, skip_downsample=False,
        prune_bn=args.prune_bn, sparse=args.pretrain_path if args.use_pretrain else None, resume=args.resume,
        evaluate=args.evaluate, gpu_ids=args.gpu_ids)


def main(args: argparse.Namespace) -> dict:
    return engine.run(recipe(args), args.overwrite)


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args(), engine.USER_ERRORS)
