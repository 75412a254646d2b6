"""Evaluate a small model built by get_small (top-1 / top-5 on the test set; the same as with zeros).

    python -m classification.infer_small --small ./snapshots/resnet50-small/small.pth /path/to/Imagenet2012
"""
import argparse

import torch

import model as reid_model
from classification import data as cdata
from classification import engine, flops
from classification.models import CIFAR_DEPTHS
from classification.small import load_small
from toolkit import cli, distributed, utils


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="CIFAR-10 folder (holding cifar-10-batches-py/) or ImageNet folder (train/, val/)")
    p.add_argument("--small", required=True,
                   help="small.pth from classification.get_small (or a checkpoint with zero filters, shrunk here)")
    p.add_argument("-b", "--batch-size", dest="batch_size", type=cli.positive_int, default=256, help="images per step")
    p.add_argument("-j", "--workers", type=cli.nonnegative_int, default=4, help="data-loading worker processes")
    p.add_argument("--gpu_ids", default="0", help="GPU id; the CPU is used when CUDA is absent")
    p.add_argument("--image_size", type=cli.positive_int, default=224, help="ImageNet crop size")
    return p


def read_small(path: str) -> tuple[dict, torch.nn.Module]:
    """(the checkpoint, its small model) of a get_small small.pth, or of a training checkpoint (this package's
    or the SFP reference code's), shrunk here as get_small would."""
    checkpoint = reid_model.load_checkpoint(path, None, "a checkpoint", "--small")
    if "kept" not in checkpoint:
        state = engine.load_checkpoint(path)
        return state, engine.shrink(state, path)[1]
    try:
        return checkpoint, load_small(checkpoint)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise engine.ModelError(f"--small {path} is not a small model of classification.get_small "
                                f"({type(e).__name__})") from None


def main(args: argparse.Namespace) -> dict:
    checkpoint, small = read_small(args.small)
    cifar = checkpoint["arch"] in CIFAR_DEPTHS
    test_set = engine.dataset(args.data, checkpoint["arch"], False, args.image_size)
    classes = 10 if cifar else len(test_set.classes)
    if classes != checkpoint["num_classes"]:
        raise engine.ModelError(f"{args.small} classifies {checkpoint['num_classes']} classes, {args.data} has "
                                f"{classes}: another dataset than the model's")
    device = distributed.setup(args.gpu_ids)
    loader = cdata.make_loader(test_set, args.batch_size, False, args.workers, rank=distributed.rank(),
                               world=distributed.world_size())
    metrics = engine.evaluate(small.to(device), loader, device)
    size = 32 if cifar else args.image_size
    if distributed.is_main():
        print(f"{args.small}: {checkpoint['arch']} small model, {flops.params(small) / 1e6:.3f} M params, "
              f"{flops.macs(small, size) / 1e6:.2f} M MACs at {size}x{size}: top-1 {metrics['top1']:.2f}% "
              f"top-5 {metrics['top5']:.2f}%")
    distributed.cleanup()
    return metrics


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args(), engine.USER_ERRORS)
