"""Train and prune a re-ID ResNet with FPGM: at every epoch end the filters nearest the geometric median
(smallest summed distance to the layer's other filters) are zeroed (conv + BN).

    python FPGM_train.py --network_arch resnet18 --name fpgm_r18 --data_dir ./datasets/Market/pytorch --prune_rate 0.5
"""
import argparse

from toolkit import cli, hooks, train_loop, utils


def get_args_parser() -> argparse.ArgumentParser:
    return train_loop.add_training_args(cli.ArgumentParser(description=__doc__.splitlines()[0]))


def main(args: argparse.Namespace) -> None:
    hooks.train_method(args, "fpgm")


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args(), hooks.USER_ERRORS)
