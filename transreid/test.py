"""Evaluate a TransReID checkpoint (pruned or not) on query/gallery: R1/R5/R10, mAP, mINP (standard protocol).

    python -m transreid.test --config_file transreid/configs/OCC_Duke/vit_transreid_stride.yml \\
        TEST.WEIGHT './logs/occ_duke_vit_transreid_stride/transformer_120.pth'

Features: cat(global, local_1/4, ..., local_4/4) before the BNNeck (TEST.NECK_FEAT), L2-normalised when
TEST.FEAT_NORM is yes, ranked by Euclidean distance. --mat writes them for evaluate_gpu.py.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from toolkit import cli, distributed, utils
from toolkit.layouts import DatasetError
from toolkit.onnx_export import export_onnx, onnx_max_difference
from toolkit.ranking import image_paths
from transreid import processor
from transreid.config import ConfigError, get_args_parser, load_config
from transreid.datasets import make_test_loader, read_dataset
from transreid.model import ModelError, model_from_checkpoint, read_reid_checkpoint


def main(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config_file, args.opts)
    if not cfg.TEST.WEIGHT:
        raise ConfigError("TEST.WEIGHT is empty: name the checkpoint to test, e.g. TEST.WEIGHT ./logs/run/best.pth")
    check_outputs(args, cfg.TEST.WEIGHT)
    ckpt = read_reid_checkpoint(cfg.TEST.WEIGHT, "TEST.WEIGHT")
    device = processor.select_device(cfg)
    splits = read_dataset(cfg)
    processor.check_checkpoint_fits(ckpt, splits, cfg.TEST.WEIGHT, "TEST.WEIGHT", classes=False)
    model = model_from_checkpoint(cfg, ckpt, cfg.TEST.WEIGHT).to(device)
    model.use_fused_attention(not args.explicit_attention)
    loader = make_test_loader(cfg, splits, distributed.rank(), distributed.world_size())
    metrics, arrays = processor.test_model(cfg, model, loader, len(splits.query), device, rerank=cfg.TEST.RE_RANKING)
    if distributed.is_main():
        print(f"{cfg.TEST.WEIGHT}: heads {model.heads_per_layer()}, tokens {ckpt.get('channels')}")
        print(f"{len(splits.query)} queries, {len(splits.gallery)} gallery images"
              f"{reranked_note() if cfg.TEST.RE_RANKING else ''}: "
              f"{processor.format_metrics(metrics)}")
        if args.mat:
            qf, ql, qc, gf, gl, gc = arrays
            utils.savemat_atomic({"query_f": qf, "query_label": ql, "query_cam": qc + 1, "gallery_f": gf,
                                  "gallery_label": gl, "gallery_cam": gc + 1,
                                  "query_path": image_paths([p for p, _, _ in splits.query]),
                                  "gallery_path": image_paths([p for p, _, _ in splits.gallery])}, args.mat)
            print(f"wrote {args.mat} (score it with: python evaluate_gpu.py --mat {args.mat} --protocol standard)")
        if args.json:
            utils.write_text_atomic(json.dumps(metrics, indent=1), args.json)
        if args.export_onnx:
            size = tuple(cfg.INPUT.SIZE_TEST)
            path = export_onnx(model.cpu(), args.export_onnx, size, dynamo=False)
            difference = onnx_max_difference(model, path, size)
            print(f"wrote {path} (input 'images' [batch, 3, {size[0]}, {size[1]}], camera 0 for SIE); ONNX Runtime "
                  f"vs PyTorch max difference " + ("n/a (onnxruntime missing)" if difference is None else
                                                   f"{difference:.1e}"))
    distributed.cleanup()
    return metrics


def reranked_note() -> str:
    from toolkit.rerank import TRANSREID_PARAMS as p
    return f" (re-ranked: k1 {p.k1}, k2 {p.k2}, lambda {p.lambda_value})"


def check_outputs(args: argparse.Namespace, weight: str) -> None:
    """No output file may name the checkpoint, and an existing one is replaced only with --overwrite."""
    cli.check_outputs({"--mat": args.mat, "--json": args.json, "--export_onnx": args.export_onnx},
                      {"TEST.WEIGHT": weight}, args.overwrite)


def get_parser() -> argparse.ArgumentParser:
    p = get_args_parser(__doc__.splitlines()[0])
    p.add_argument("--mat", type=Path, default=None,
                   help="also write the scored features, ids and cameras (1-based) as a .mat file for evaluate_gpu.py")
    p.add_argument("--json", type=Path, default=None, help="also write the metrics as JSON")
    p.add_argument("--export_onnx", type=Path, default=None,
                   help="also export the (pruned) model's test feature as ONNX to this file and check it under ONNX "
                        "Runtime")
    p.add_argument("--overwrite", action="store_true", help="replace existing --mat, --json or --export_onnx files")
    p.add_argument("--explicit_attention", action="store_true",
                   help="compute attention as softmax(q.k) instead of scaled_dot_product_attention (same features)")
    return p


if __name__ == "__main__":
    cli.run_main(main, get_parser().parse_intermixed_args(),
                 (ConfigError, DatasetError, ModelError, processor.RunError))
