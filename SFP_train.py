"""Train and prune a re-ID ResNet with SFP (soft filter pruning): at every epoch end the filters with
the smallest L2 norm are zeroed (conv + BN) and keep training in the next epoch.

    python SFP_train.py --network_arch resnet50 --name sfp_r50 --data_dir ./datasets/Market/pytorch --prune_rate 0.5
"""
import argparse

from toolkit import cli, hooks, train_loop, utils


def get_args_parser() -> argparse.ArgumentParser:
    return train_loop.add_training_args(cli.ArgumentParser(description=__doc__.splitlines()[0]))


def main(args: argparse.Namespace) -> None:
    hooks.train_method(args, "sfp")


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args(), hooks.USER_ERRORS)
