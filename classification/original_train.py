"""Train an unpruned ImageNet ResNet (the SFP paper's baseline), with the SFP code's command line.

    python -m classification.original_train -a resnet50 --save_dir ./snapshots/resnet50-baseline /path/to/Imagenet2012
"""
import argparse

from classification import engine
from classification.flags import add_imagenet_args, recipe
from toolkit import cli, utils


def get_args_parser() -> argparse.ArgumentParser:
    return add_imagenet_args(cli.ArgumentParser(description=__doc__.splitlines()[0]))


def main(args: argparse.Namespace) -> dict:
    return engine.run(recipe(args, prune=False), args.overwrite)


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args(), engine.USER_ERRORS)
