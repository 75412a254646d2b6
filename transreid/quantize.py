"""INT8 TransReID on the CPU: export the (AMG-pruned) model to ONNX, quantize it, and compare it with float32.

    python -m transreid.quantize --config_file transreid/configs/OCC_Duke/vit_transreid_stride_attn.yml \\
        TEST.WEIGHT ./logs/occ_duke_attn/best.pth --out ./logs/occ_duke_attn/int8
    python -m transreid.quantize ... --unpruned ./logs/occ_duke_vit_transreid_stride/transformer_120.pth
    python -m transreid.quantize ... --mode static --calib_images 256

Modes (ONNX Runtime): dynamic (default) quantizes the weights of every MatMul/Gemm to INT8 and the
activations on the fly; static writes QDQ with per-channel INT8 weights and UINT8 activation ranges
calibrated by min/max on --calib_images training images, LayerNorm, Softmax and GELU kept in float.
The token keep sets and removed heads of the checkpoint are part of the exported graph.

Writes to --out: fp32.onnx and int8_<mode>.onnx (with --unpruned also unpruned_fp32.onnx and
unpruned_int8_<mode>.onnx), and quantization.csv / .json, the printed table: parameters, file size,
whole-model MACs, batch-1 and batch-32 latency under ONNX Runtime, feature cosine to the float32 export,
and R1 / mAP / mINP on DATASETS (standard protocol, the project's evaluator, as transreid.test scores).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import model as model_lib
from toolkit import cli, int8, utils
from toolkit.int8 import QuantizationError
from toolkit.latency import add_ratios, format_table, median_latencies, write_outputs
from toolkit.layouts import DatasetError
from toolkit.onnx_export import export_onnx, onnx_feeds, onnx_max_difference, onnx_session
from transreid import processor
from transreid.config import ConfigError, get_args_parser, load_config
from transreid.datasets import ImageList, read_dataset, test_transform
from transreid.model import ARCH_WIDTHS, ModelError, TransReID, model_from_checkpoint, read_reid_checkpoint

PARITY_TOLERANCE = 1e-4  # float32 ONNX Runtime vs PyTorch features, before anything is quantized


def uses_cameras(net: TransReID) -> bool:
    return net.base.sie_embed is not None


def export_vit(net: TransReID, path: Path, size: tuple[int, int]) -> Path:
    """ONNX (opset 18, dynamic batch) of the test feature: inputs 'images' [and 'cams' with SIE], 'features'."""
    net.eval().cpu().use_fused_attention(True)
    return export_onnx(net, path, size, dynamo=False, cameras=uses_cameras(net))


def session_features(session, loader: DataLoader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    feats, pids, cams = [], [], []
    for imgs, pid, cam in loader:
        feats.append(session.run(None, onnx_feeds(session, imgs.numpy(), cam.numpy()))[0])
        pids.append(pid.numpy())
        cams.append(cam.numpy())
    return np.concatenate(feats), np.concatenate(pids), np.concatenate(cams)


def calibration_feeds(cfg, splits, n_images: int, seed: int = 0, batch: int = 16) -> list[dict[str, np.ndarray]]:
    """`n_images` training images (a seeded choice), test-transformed, with their cameras, in batches."""
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(seed))[:n_images].tolist()
    loader = DataLoader(ImageList([splits.train[i] for i in order], test_transform(cfg)), batch_size=batch)
    return [{"images": imgs.numpy(), "cams": cam.numpy().astype(np.int64)} for imgs, _, cam in loader]


def is_pruned(net: TransReID) -> bool:
    widths = ARCH_WIDTHS[net.arch]
    return net.token_keep() is not None or net.heads_per_layer() != [widths["heads"]] * widths["depth"]


def check_out(out: Path, overwrite: bool, inputs: list[str]) -> None:
    if any(Path(p).resolve() == out.resolve() or out.resolve() in Path(p).resolve().parents for p in inputs):
        raise QuantizationError(f"--out {out} holds one of the input checkpoints; choose another folder")
    if out.exists() and not out.is_dir():
        raise QuantizationError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise QuantizationError(f"{out} already holds results: pass --overwrite to replace them, or choose "
                                "another --out")


def load_models(cfg, args: argparse.Namespace, splits) -> dict[str, TransReID]:
    """{"": the model of TEST.WEIGHT, "unpruned": the start model} (the second only with --unpruned)."""
    models = {}
    for key, path, what in (("", cfg.TEST.WEIGHT, "TEST.WEIGHT"), ("unpruned", args.unpruned, "--unpruned")):
        if not path:
            continue
        ckpt = read_reid_checkpoint(path, what)
        processor.check_checkpoint_fits(ckpt, splits, path, what, classes=False)
        models[key] = model_from_checkpoint(cfg, ckpt, path).eval()
    if args.unpruned:
        if not is_pruned(models[""]):
            raise QuantizationError(f"TEST.WEIGHT {cfg.TEST.WEIGHT} is not pruned (no token keep sets, all heads): "
                                    "with --unpruned, name the AMG checkpoint as TEST.WEIGHT")
        if is_pruned(models["unpruned"]):
            raise QuantizationError(f"--unpruned {args.unpruned} is a pruned model: name the unpruned start "
                                    "checkpoint")
    return models


def main(args: argparse.Namespace) -> list[dict]:
    cfg = load_config(args.config_file, args.opts)
    if not cfg.TEST.WEIGHT:
        raise ConfigError("TEST.WEIGHT is empty: name the (pruned) checkpoint to quantize")
    if args.mode == "dynamic" and args.calib_images is not None:
        raise QuantizationError("--calib_images is for --mode static (dynamic quantization needs no calibration)")
    int8.require_onnx(dynamo_exporter=False)
    out = Path(args.out)
    check_out(out, args.overwrite, [p for p in (cfg.TEST.WEIGHT, args.unpruned) if p])
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = read_dataset(cfg)
    models = load_models(cfg, args, splits)
    size = tuple(cfg.INPUT.SIZE_TEST)
    calib = calibration_feeds(cfg, splits, args.calib_images or 256) if args.mode == "static" else None
    loader = DataLoader(ImageList(splits.query + splits.gallery, test_transform(cfg)),
                        batch_size=cfg.TEST.IMS_PER_BATCH, num_workers=cfg.DATALOADER.NUM_WORKERS)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.is_dir() else None) as tmp:
        staged = Path(tmp)  # every file is made here first: a failure leaves --out as it was
        files = {}
        for key in sorted(models, key=lambda k: k != "unpruned"):  # the unpruned rows first: the ratios' base
            prefix = f"{key}_" if key else ""
            fp32 = export_vit(models[key], staged / f"{prefix}fp32.onnx", size)
            difference = onnx_max_difference(models[key], fp32, size)
            if not difference <= PARITY_TOLERANCE:
                raise QuantizationError(f"the float32 ONNX export differs from PyTorch by {difference:.1e} "
                                        f"(more than {PARITY_TOLERANCE:g}); nothing was written")
            target = staged / f"{prefix}int8_{args.mode}.onnx"
            if args.mode == "dynamic":
                quantized = int8.quantize_dynamic(fp32, target)
            else:
                session = onnx_session(fp32)
                quantized = int8.quantize_static(fp32, target, [onnx_feeds(session, **f) for f in calib],
                                                 op_types=int8.MATRIX_OPS)
            files[key] = (fp32, quantized, difference)
        rows = table(cfg, models, files, loader, len(splits.query), size, args)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for fp32, quantized, _ in files.values():
            for f in (fp32, quantized):
                shutil.move(f, out / f.name)
    print(f"{cfg.TEST.WEIGHT}: {int8_name(args.mode)} under ONNX Runtime, {args.threads or torch.get_num_threads()} "
          f"threads, {len(splits.query)} queries / {len(splits.gallery)} gallery images")
    print(format_table(rows, args.batch_sizes))
    write_outputs(rows, out / "quantization")
    print(f"wrote {out}/quantization.csv and .json and the ONNX files")
    return rows


def int8_name(mode: str) -> str:
    return "INT8 dynamic" if mode == "dynamic" else "INT8 static (QDQ)"


def table(cfg, models: dict[str, TransReID], files: dict, loader: DataLoader, num_query: int,
          size: tuple[int, int], args: argparse.Namespace) -> list[dict]:
    """One row per ONNX file: params, MACs, file size, cosine to float32, R1/mAP/mINP, latency per batch."""
    rows, runners = [], {}
    inputs = {b: torch.randn(b, 3, *size, generator=torch.Generator().manual_seed(b)).numpy()
              for b in args.batch_sizes}
    for key, (fp32, quantized, difference) in files.items():  # key: "" (TEST.WEIGHT) or "unpruned"
        net = models[key]
        label = "pruned" if is_pruned(net) else "unpruned"
        params, macs = model_lib.inference_params(net), utils.count_macs(net, size)
        reference = None
        for kind, path in (("fp32", fp32), ("int8", quantized)):
            session = onnx_session(path, args.threads, spinning=False)
            feats, pids, cams = session_features(session, loader)
            if not np.isfinite(feats).all():
                raise QuantizationError(f"{path.name} gives NaN or infinite features; nothing was written")
            reference = feats if reference is None else reference
            metrics = processor.score_features(cfg, feats, pids, cams, num_query)[0]
            name = f"{label} {'float32' if kind == 'fp32' else int8_name(args.mode)}"
            rows.append({"model": name, "file": path.name, "params": params, "macs": macs,
                         "size_mb": path.stat().st_size / 1e6,
                         "cosine": float(int8.feature_cosine(reference, feats).mean()), "mAP": metrics["mAP"],
                         "R1": metrics["rank1"], "mINP": metrics["mINP"], "onnx_vs_pytorch": difference})
            runners[name] = {b: (lambda s=session, x=x: s.run(None, onnx_feeds(s, x)))
                             for b, x in inputs.items()}
    for b in args.batch_sizes:
        ms = median_latencies({name: fns[b] for name, fns in runners.items()}, args.warmup, args.repeats)
        for row in rows:
            row[f"ms_b{b}"] = ms[row["model"]]
    return add_ratios(rows, args.batch_sizes)


def get_parser() -> argparse.ArgumentParser:
    p = get_args_parser(__doc__.splitlines()[0])
    p.prog = "python -m transreid.quantize"
    p.add_argument("--out", type=Path, required=True, help="output folder for the ONNX files and the table")
    p.add_argument("--mode", choices=int8.MODES, default="dynamic",
                   help="dynamic: INT8 MatMul/Gemm weights, activations quantized on the fly (default); static: "
                        "QDQ with activation ranges calibrated on training images")
    p.add_argument("--calib_images", type=cli.positive_int, default=None,
                   help="--mode static: training images that calibrate the activation ranges (default 256)")
    p.add_argument("--unpruned", default=None,
                   help="checkpoint of the unpruned start model: adds its float32 and INT8 rows (TEST.WEIGHT must "
                        "then be the pruned one)")
    p.add_argument("--batch_sizes", type=cli.positive_int_list, default=[1, 32], help="comma-separated batch sizes")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=2, help="untimed runs before timing")
    p.add_argument("--repeats", type=cli.positive_int, default=10, help="timed runs; the median is reported")
    p.add_argument("--threads", type=cli.positive_int, default=None, help="CPU threads (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace the results in an existing --out folder")
    return p


if __name__ == "__main__":
    cli.run_main(main, get_parser().parse_intermixed_args(),
                 (ConfigError, DatasetError, ModelError, QuantizationError, processor.RunError))
