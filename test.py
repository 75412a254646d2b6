"""Extract query/gallery features of a trained run and write pytorch_result.mat.

    python test.py --name bafd_r18 --which_epoch last --test_dir ./datasets/Market/pytorch
    python evaluate_gpu.py

The feature of an image is f(x) + f(flip(x)), L2-normalised. Ids and cameras come from the file names
(Market, Duke and MSMT17 patterns). Arch and class count are read from the checkpoint itself.
"""
from __future__ import annotations

import argparse

import model as model_lib
from toolkit import cli, distributed, utils
from toolkit.features import add_test_args, find_run, input_size, load_run_model, write_features
from toolkit.layouts import DatasetError
from toolkit.ranking import EvaluationError


def get_args_parser() -> argparse.ArgumentParser:
    return add_test_args(cli.ArgumentParser(description=__doc__.splitlines()[0]))


def main(args: argparse.Namespace) -> dict:
    run = find_run(args.name, args.results_dir)
    net, opts = load_run_model(run, args.which_epoch, args.network_arch)
    device = distributed.setup(args.gpu_ids)
    net = net.to(device)
    size = input_size(args, opts)
    params, macs = model_lib.inference_params(net), utils.count_macs(net, size)
    if distributed.is_main():
        print(f"{run}: {type(net).__name__} {net.arch}, {params / 1e6:.3f} M params, {macs / 1e9:.4f} GMACs "
              f"at {size[0]}x{size[1]}")
    write_features(net, args.test_dir, size, device, args)
    distributed.cleanup()
    return {"params": params, "macs": macs, "run": str(run)}


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args(),
                   (DatasetError, model_lib.ModelError, EvaluationError))
