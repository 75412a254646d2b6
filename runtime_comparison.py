"""Latency of the full, the zeroed, the small model and its deployment form (and under ONNX Runtime).

    python runtime_comparison.py --name bafd_r50 --NonL1                 # CPU, batch 1 and 32
    python runtime_comparison.py --name hfp_r18 --prune_rate 0.5 --threads 1 --device cpu

Each latency is the median of --repeats timed runs after --warmup untimed ones. The table (params,
MACs, theoretical MAC ratio, measured speed-up over the full model) is printed and written as CSV and
JSON next to the checkpoint (RUN/runtime_<epoch>_<device>.csv/.json).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import model as model_lib
from pruner import PruneError
from toolkit import cli, data, features, onnx_export, utils
from toolkit.int8 import QuantizationError, calibration_batches, onnx_available, quantize_onnx
from toolkit.latency import OPTIONAL_COLUMNS, add_ratios, compare, format_table, median_latencies, write_outputs  # noqa: F401
from toolkit.layouts import DatasetError
from toolkit.surgery import make_deploy_model, small_from_checkpoint


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="run folder, or a run name under RESULTS_DIR/ft_<arch>/")
    p.add_argument("--which_epoch", default="last", help="checkpoint net_<which_epoch>.pth")
    p.add_argument("--results_dir", default="./results", help="root folder of all runs")
    p.add_argument("--NonL1", action="store_true", help="zeroed BAFD/SFP/FPGM checkpoint (see test_small.py)")
    p.add_argument("--prune_rate", type=cli.prune_fraction, default=None,
                   help="HFP: L1 rule at this rate (see test_small.py)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=cli.positive_int, default=None, help="CPU threads for PyTorch and ONNX Runtime")
    p.add_argument("--batch_sizes", type=cli.positive_int_list, default="1,32", help="comma-separated batch sizes")
    p.add_argument("--height", type=cli.positive_int, default=256, help="input height")
    p.add_argument("--width", type=cli.positive_int, default=128, help="input width")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=5, help="untimed runs before timing")
    p.add_argument("--repeats", type=cli.positive_int, default=20, help="timed runs (the median is reported)")
    p.add_argument("--no_onnx", action="store_true",
                   help="skip the ONNX Runtime rows (they need onnxruntime and onnxscript, and run on the CPU)")
    p.add_argument("--int8", action="store_true",
                   help="add the small model quantized to INT8 (quantize.py's static quantization of the deploy "
                        "form, written as RUN/net_<epoch>_small_int8.onnx)")
    p.add_argument("--calib_dir", default=None,
                   help="--int8: prepared dataset(s) whose training images calibrate (default: the run's --data_dir)")
    p.add_argument("--calib_images", type=cli.positive_int, default=256, help="--int8: number of calibration images")
    onnx_export.add_exporter_argument(p)
    p.add_argument("--test_dir", default=None,
                   help="also report mAP and Rank-1 of every row on this prepared dataset's query/gallery")
    return p


def int8_file(run: Path, deploy: torch.nn.Module, args: argparse.Namespace, size: tuple[int, int]) -> Path:
    """RUN/net_<epoch>_small_int8.onnx: the deploy form statically quantized, calibrated on training images."""
    opts = utils.load_options(run / "opts.yaml") if (run / "opts.yaml").is_file() else {}
    source = args.calib_dir or opts.get("data_dir")
    if not source:
        raise DatasetError("--int8 needs calibration images: pass --calib_dir DATASET/pytorch")
    batches = calibration_batches(data.training_dirs(source, bool(opts.get("train_all", True))),
                                           args.calib_images, size)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = onnx_export.export_onnx(deploy, Path(tmp) / "fp32.onnx", size, args.onnx_exporter == "dynamo")
        return quantize_onnx(fp32, run / f"net_{args.which_epoch}_small_int8.onnx", batches)


def main(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_onnx = not args.no_onnx and device.type == "cpu" and onnx_available()
    if args.int8 and not use_onnx:
        raise DatasetError("--int8 needs the ONNX Runtime rows: CPU, onnxruntime and onnxscript installed, "
                           "no --no_onnx")
    run = features.find_run(args.name, args.results_dir)
    state = model_lib.load_checkpoint(run / f"net_{args.which_epoch}.pth")
    zeroed, small = small_from_checkpoint(state, args.NonL1, args.prune_rate)
    if args.threads:
        torch.set_num_threads(args.threads)
    full = model_lib.ft_net(model_lib.num_classes(state), small.arch)
    models = {"full": full, "zeroed": zeroed, "small": small, "small deploy": make_deploy_model(small)}
    size, batch_sizes = (args.height, args.width), args.batch_sizes
    extra = {}
    if args.int8:
        extra["small deploy int8 (onnxruntime)"] = (int8_file(run, models["small deploy"], args, size),
                                                     models["small deploy"])
    rows = compare(models, size, batch_sizes, device, args.warmup, args.repeats, args.threads,
                   ("full", "small", "small deploy") if use_onnx else (), extra, args.test_dir,
                   args.onnx_exporter == "dynamo")
    print(f"{run}: {small.arch} at {size[0]}x{size[1]} on {device}"
          f"{f' ({torch.get_num_threads()} threads)' if device.type == 'cpu' else ''}")
    print(format_table(rows, batch_sizes))
    stem = run / f"runtime_{args.which_epoch}_{device.type}"
    write_outputs(rows, stem)
    print(f"wrote {stem}.csv and {stem}.json")
    return rows


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args(),
                   (DatasetError, model_lib.ModelError, PruneError, QuantizationError))
