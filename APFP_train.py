"""Train and prune a re-ID ResNet with BAFD (blockwise adjacent filter decaying).

    python APFP_train.py --network_arch resnet18 --name bafd_r18 --data_dir ./datasets/Market/pytorch \\
        --train_all --prune_rate 0.9 --max_lrate 0.95 --knn 2 --decay_rate 0.3 --efficient_pruning

Layer rates are allocated once on the initial weights; at every epoch end the selected filters decay
(x --decay_rate); net_<epoch>.pth / net_last.pth hold hard-zeroed weights.
"""
import argparse

from toolkit import cli, hooks, train_loop, utils


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    return hooks.add_pruning_args(train_loop.add_training_args(parser))


def main(args: argparse.Namespace) -> None:
    hooks.train_method(args, "bafd")


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args(), hooks.USER_ERRORS)
