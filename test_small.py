"""Build the physically smaller network of a pruned run, check it, save it, and test it like test.py.

    python test_small.py --name bafd_r18 --NonL1 --test_dir ./datasets/Market/pytorch    # BAFD / SFP / FPGM
    python test_small.py --name hfp_r18 --prune_rate 0.5 --test_dir ...                   # HFP (L1 rule)
    python evaluate_gpu.py                                                                # same numbers as test.py

The small model's features equal the zeroed model's up to float rounding (the difference is printed).
It is saved as RUN/net_<epoch>_small.pth, a self-describing state dict:
    small_model.small_model_from_state_dict(torch.load(path, weights_only=True))
"""
from __future__ import annotations

import argparse
from pathlib import Path

import model as model_lib
from pruner import PruneError
from toolkit import cli, features, utils
from toolkit.layouts import DatasetError
from toolkit.ranking import EvaluationError
from toolkit.surgery import make_deploy_model, make_small_model, max_feature_difference, small_from_checkpoint  # noqa: F401

EXACT_TOLERANCE = 1e-5


def get_args_parser() -> argparse.ArgumentParser:
    p = features.add_test_args(cli.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--NonL1", action="store_true",
                   help="the checkpoint is a zeroed BAFD/SFP/FPGM one: remove its all-zero filters")
    p.add_argument("--prune_rate", type=cli.prune_fraction, default=None,
                   help="HFP: remove the filters with the smallest L1 norm at this rate (without --NonL1)")
    p.add_argument("--save", default=None, help="where to save the small model (default RUN/net_<epoch>_small.pth)")
    p.add_argument("--export_onnx", default=None, metavar="PATH",
                   help="also export the small model as ONNX (opset 18, dynamic batch) in its deployment form "
                        "(small_model.make_deploy_model: same features, faster kernels) and check it")
    p.add_argument("--no_features", action="store_true", help="build, check, save and export only")
    return p


def main(args: argparse.Namespace) -> dict:
    run = features.find_run(args.name, args.results_dir)
    state = model_lib.load_checkpoint(run / f"net_{args.which_epoch}.pth")
    opts = utils.load_options(run / "opts.yaml") if (run / "opts.yaml").is_file() else {}
    size = features.input_size(args, opts)
    zeroed, small = small_from_checkpoint(state, args.NonL1, args.prune_rate, args.network_arch)
    diff = max_feature_difference(zeroed, small, size)
    if diff > EXACT_TOLERANCE:
        raise model_lib.ModelError(f"the small model differs from the zeroed one by {diff:.2e} (> {EXACT_TOLERANCE})")
    full_cost = (model_lib.inference_params(zeroed), utils.count_macs(zeroed, size))
    small_cost = (model_lib.inference_params(small), utils.count_macs(small, size))
    print(f"{run} ({small.arch}, {size[0]}x{size[1]}): max |small - zeroed| feature difference {diff:.2e}")
    print(f"  full : {full_cost[0] / 1e6:8.3f} M params {full_cost[1] / 1e9:8.4f} GMACs")
    print(f"  small: {small_cost[0] / 1e6:8.3f} M params {small_cost[1] / 1e9:8.4f} GMACs "
          f"({full_cost[0] / small_cost[0]:.2f}x fewer params, {full_cost[1] / small_cost[1]:.2f}x fewer MACs)")
    save = Path(args.save or run / f"net_{args.which_epoch}_small.pth")
    utils.save_atomic(small.state_dict(), save)
    print(f"saved the small model to {save}")
    if args.export_onnx:
        from toolkit import onnx_export
        path = onnx_export.export_onnx(make_deploy_model(small), args.export_onnx, size)
        onnx_diff = onnx_export.onnx_max_difference(small, path, size)
        check = "onnxruntime not installed: not checked" if onnx_diff is None else f"max |onnx - torch| {onnx_diff:.2e}"
        print(f"exported {path} (opset {onnx_export.OPSET}, dynamic batch, deployment form): {check}")
    if not args.no_features:
        device = utils.select_device(args.gpu_ids)
        features.write_features(small.to(device), args.test_dir, size, device, args)
    return {"params": small_cost[0], "macs": small_cost[1], "full_params": full_cost[0], "full_macs": full_cost[1],
            "max_difference": diff, "small_path": str(save)}


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args(),
                   (DatasetError, model_lib.ModelError, EvaluationError, PruneError))
