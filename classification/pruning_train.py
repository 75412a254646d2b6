"""SFP on ImageNet ResNets, with the SFP code's command line.

    python -m classification.pruning_train -a resnet50 --save_dir ./snapshots/resnet50-rate-0.7 --rate 0.7 \\
        --layer_begin 0 --layer_end 156 --layer_inter 3 /path/to/Imagenet2012
    python -m classification.pruning_train -a resnet50 --use_pretrain --lr 0.01 ...   # from ImageNet weights
    python -m classification.pruning_train -a resnet50 -e --resume CHECKPOINT ... DATA # evaluate with zeros

--rate is the fraction of filters KEPT. layer_end per arch: resnet18 57, resnet34 105, resnet50 156,
resnet101 309, resnet152 462. DATA holds train/<wnid>/*.JPEG and val/<wnid>/*.JPEG.
"""
import argparse

from classification import engine
from classification.flags import add_imagenet_args, recipe
from toolkit import cli, utils


def get_args_parser() -> argparse.ArgumentParser:
    p = add_imagenet_args(cli.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--rate", type=cli.keep_fraction, default=0.7, help="fraction of filters KEPT (0.7 prunes 30%%)")
    p.add_argument("--layer_begin", type=cli.nonnegative_int, default=0, help="first parameter index pruned")
    p.add_argument("--layer_end", type=cli.nonnegative_int, default=None,
                   help="last parameter index pruned, inclusive (default: the arch's last conv)")
    p.add_argument("--layer_inter", type=cli.positive_int, default=3, help="parameter-index step (3: every conv)")
    p.add_argument("--epoch_prune", type=cli.positive_int, default=1, help="re-select and zero every N epochs")
    p.add_argument("--skip_downsample", type=int, choices=[0, 1], default=1,
                   help="1: leave the downsample convs unpruned (the paper); 0: prune them too")
    p.add_argument("--use_sparse", action="store_true", help="start from the pruned checkpoint --sparse")
    p.add_argument("--sparse", default=None, help="checkpoint for --use_sparse")
    return p


def main(args: argparse.Namespace) -> dict:
    return engine.run(recipe(args), args.overwrite)


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args(), engine.USER_ERRORS)
