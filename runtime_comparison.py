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

import cli
import data
import model as model_lib
import onnx_export
import test as test_lib
import utils
from dataset_layout import DatasetError
from pruner import PruneError
from small_model import make_deploy_model, small_from_checkpoint
from toolkit.int8 import QuantizationError, onnx_available
from toolkit.latency import OPTIONAL_COLUMNS, add_ratios, format_table, median_latencies, write_outputs  # noqa: F401


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


def compare(models: dict[str, torch.nn.Module], input_size: tuple[int, int], batch_sizes: list[int],
            device: torch.device, warmup: int, repeats: int, onnx_threads: int | None = None,
            onnx_models: tuple[str, ...] = (), extra_onnx: dict[str, tuple[Path, torch.nn.Module]] | None = None,
            test_dir: str | Path | None = None, onnx_dynamo: bool = True) -> list[dict]:
    """One row per model, per model named in onnx_models also run under ONNX Runtime, and per ready ONNX
    file in extra_onnx ({row name: (path, the model it computes)}, e.g. an INT8 one): params, MACs, MAC
    ratio, size of the ONNX files, mAP and Rank-1 on test_dir (when given) and latency per batch size.
    MAC ratio and speed-up are relative to the first model. All rows of one batch size are timed in turns."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows, runners, features = [], {}, {}
    inputs = {b: torch.randn(b, 3, *input_size, device=device) for b in batch_sizes}

    def add_onnx(name: str, path: Path, net: torch.nn.Module) -> None:
        # no spinning: idle worker threads of one session would take the cores from the next one timed
        session = onnx_export.onnx_session(path, onnx_threads, spinning=False)
        rows.append({"model": name, "params": model_lib.inference_params(net),
                     "macs": utils.count_macs(net, input_size), "size_mb": path.stat().st_size / 1e6})
        runners[name] = {b: (lambda x=x.cpu().numpy(): session.run(None, {"images": x})) for b, x in inputs.items()}
        features[name] = lambda images: onnx_export.onnx_features(session, images)

    for name, net in models.items():
        net = net.eval().to(device)
        rows.append({"model": name, "params": model_lib.inference_params(net),
                     "macs": utils.count_macs(net, input_size)})
        runners[name] = {b: (lambda net=net, x=x: net.extract(x)) for b, x in inputs.items()}
        features[name] = lambda images, net=net, name=name: test_lib.extract_features(net, images, device, 64, 0,
                                                                                       name)
    with tempfile.TemporaryDirectory() as tmp:
        for name in onnx_models:
            path = onnx_export.export_onnx(models[name], Path(tmp) / f"{len(rows)}.onnx", input_size, onnx_dynamo)
            add_onnx(f"{name} (onnxruntime)", path, models[name])
        for name, (path, net) in (extra_onnx or {}).items():
            add_onnx(name, Path(path), net)
        if test_dir is not None:
            for row in rows:
                row.update(test_lib.reid_accuracy(features[row["model"]], test_dir, input_size))
        with torch.inference_mode():
            for b in batch_sizes:
                ms = median_latencies({name: fns[b] for name, fns in runners.items()}, warmup, repeats, sync)
                for row in rows:
                    row[f"ms_b{b}"] = ms[row["model"]]
    return add_ratios(rows, batch_sizes)


def int8_file(run: Path, deploy: torch.nn.Module, args: argparse.Namespace, size: tuple[int, int]) -> Path:
    """RUN/net_<epoch>_small_int8.onnx: the deploy form statically quantized, calibrated on training images."""
    from quantize import calibration_batches, quantize_onnx
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
    run = test_lib.find_run(args.name, args.results_dir)
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
