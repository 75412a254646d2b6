"""The SFP ImageNet code's command line, shared by classification.pruning_train (SFP) and
classification.original_train (the unpruned baseline), and its translation into an engine.Recipe."""
import argparse

from classification import engine
from classification.models import IMAGENET_ARCHS
from classification.sfp import last_conv_index
from toolkit import cli


def add_imagenet_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags original_train.py and pruning_train.py share (the PyTorch ImageNet example's)."""
    p.add_argument("data", help="ImageNet folder with train/ and val/ class folders")
    p.add_argument("-a", "--arch", choices=IMAGENET_ARCHS, default="resnet18", help="torchvision ResNet")
    p.add_argument("--save_dir", default="./snapshots/run", help="folder for checkpoints, log.csv, metrics.json")
    p.add_argument("-j", "--workers", type=cli.nonnegative_int, default=4, help="data-loading worker processes")
    p.add_argument("--epochs", type=cli.positive_int, default=100, help="training epochs")
    p.add_argument("-b", "--batch-size", dest="batch_size", type=cli.positive_int, default=256,
                   help="images per step and process (N torchrun processes x B train as one process with N x B)")
    p.add_argument("--lr", "--learning-rate", dest="lr", type=cli.positive_float, default=0.1,
                   help="initial learning rate (0.01 with --use_pretrain, as in the paper)")
    p.add_argument("--momentum", type=cli.probability, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", "--wd", dest="weight_decay", type=cli.nonnegative_float, default=1e-4,
                   help="weight decay")
    p.add_argument("--lr_adjust", type=cli.positive_int, default=30,
                   help="divide the learning rate by 10 every N epochs")
    p.add_argument("--resume", default=None, help="continue this checkpoint.pth (with -e: evaluate it)")
    p.add_argument("-e", "--evaluate", action="store_true", help="only evaluate --resume (the model with zeros)")
    p.add_argument("--use_pretrain", action="store_true",
                   help="start from ImageNet weights (torchvision's local cache, or --pretrained FILE)")
    p.add_argument("--pretrained", default=None, help="a torchvision ImageNet state dict for --use_pretrain")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0, help="random seed")
    engine.add_device_args(p)
    return p


def recipe(args: argparse.Namespace, prune: bool = True) -> engine.Recipe:
    if getattr(args, "use_sparse", False) and not args.sparse:
        raise cli.UsageError("--use_sparse needs --sparse CHECKPOINT")
    if args.pretrained and not args.use_pretrain:
        raise cli.UsageError("--pretrained FILE is read only with --use_pretrain")
    return engine.Recipe(
        data=args.data, arch=args.arch, save_dir=args.save_dir, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, nesterov=False, workers=args.workers,
        seed=args.seed, lr_adjust=args.lr_adjust, prune=prune and args.rate < 1,
        rate=args.rate if prune else 1.0, layer_begin=args.layer_begin if prune else 0,
        layer_end=(args.layer_end if args.layer_end is not None else last_conv_index(args.arch)) if prune else 0,
        layer_inter=args.layer_inter if prune else 3, epoch_prune=args.epoch_prune if prune else 1,
        skip_downsample=bool(args.skip_downsample) if prune else True, prune_bn=args.prune_bn,
        pretrained=(args.pretrained or True) if args.use_pretrain else False,
        sparse=args.sparse if getattr(args, "use_sparse", False) else None, resume=args.resume,
        evaluate=args.evaluate, gpu_ids=args.gpu_ids, image_size=args.image_size)
