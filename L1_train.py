"""HFP (hard filter pruning): remove the filters with the smallest L1 norm of the initial weights once,
then fine-tune the physically smaller network (learning rate 0.005).

    python L1_train.py --network_arch resnet18 --name hfp_r18 --data_dir ./datasets/Market/pytorch --prune_rate 0.5
"""
import argparse

from toolkit import cli, hooks, train_loop, utils


def get_args_parser() -> argparse.ArgumentParser:
    return train_loop.add_training_args(cli.ArgumentParser(description=__doc__.splitlines()[0]), lr=0.005)


def main(args: argparse.Namespace) -> None:
    hooks.train_method(args, "hfp")


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args(), hooks.USER_ERRORS)
