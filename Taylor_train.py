"""Train and prune a re-ID ResNet with first-order Taylor importance (Molchanov et al., CVPR 2019): at every
epoch end, a few training batches give each filter |sum of activation x gradient| of its output map, and
the least important filters of every pruned conv are zeroed (conv + BN), as SFP zeroes its L2 choice.

    python Taylor_train.py --network_arch resnet18 --name taylor_r18 --data_dir ./datasets/Market/pytorch \\
        --prune_rate 0.5 --taylor_batches 8
"""
import argparse

from toolkit import cli, hooks, train_loop, utils


def get_args_parser() -> argparse.ArgumentParser:
    parser = train_loop.add_training_args(cli.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--taylor_batches", type=cli.positive_int, default=8,
                        help="training batches the importance is accumulated over at every epoch end")
    return parser


def main(args: argparse.Namespace) -> None:
    hooks.train_method(args, "taylor")


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args(), hooks.USER_ERRORS)
