"""Latency of a TransReID unpruned, token-pruned, head-pruned and both, in PyTorch and ONNX Runtime.

    python -m transreid.runtime --config_file transreid/configs/Market/vit_transreid_stride.yml   # random weights
    python -m transreid.runtime --config_file ... --checkpoint heads+tokens=./logs/market_head/best.pth

Without checkpoints the pruned rows are the configured model with random weights and random AMG masks
at --token_rate / --head_rate (same counts as AMG removes; timing does not depend on which ones). Each
row: parameters, whole-model MACs (explicit attention), AMG's GFLOPs of the prunable blocks, their ratios
to the first row and the median latency per batch size; PyTorch rows use scaled_dot_product_attention.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from toolkit import cli, int8
from toolkit.int8 import QuantizationError
from toolkit.latency import compare, format_table, write_outputs
from toolkit.onnx_export import export_onnx
from transreid import amg
from transreid.config import ConfigError, get_args_parser, load_config
from transreid.model import ModelError, TransReID, make_model, model_from_checkpoint, read_reid_checkpoint


def random_pruned(cfg, token_rate: float, head_rate: float, seed: int = 0) -> TransReID:
    """The configured model (random weights) with AMG's counts of tokens and heads removed at random."""
    torch.manual_seed(seed)
    model = make_model(cfg, 751, 6)
    gen = torch.Generator().manual_seed(seed)
    blocks = model.prunable_blocks
    if token_rate > 0:
        p = model.base.patch_embed.num_patches
        scores = [torch.rand(p, generator=gen, dtype=torch.float64) for _ in blocks]
        amg.apply_token_masks(model, amg.select_tokens(scores, amg.prune_counts(model, "attn", token_rate)))
    if head_rate > 0:
        scores = [torch.rand(b.attn.heads, generator=gen, dtype=torch.float64) for b in blocks]
        amg.apply_head_masks(model, amg.select_heads(scores, amg.prune_counts(model, "heads", head_rate)))
    return model.eval()


def variants(cfg, args: argparse.Namespace) -> dict[str, TransReID]:
    if args.checkpoint:
        models = {}
        for item in args.checkpoint:
            name, sep, path = item.partition("=")
            if not sep:
                raise ConfigError(f"--checkpoint {item!r}: write NAME=PATH")
            if name in models:
                raise ConfigError(f"--checkpoint names {name!r} twice: every row needs its own NAME")
            models[name] = model_from_checkpoint(cfg, read_reid_checkpoint(path, "--checkpoint"), path).eval()
        return models
    t, h = args.token_rate, args.head_rate
    return {"unpruned": random_pruned(cfg, 0, 0), f"token {t:.0%}": random_pruned(cfg, t, 0),
            f"head {h:.0%}": random_pruned(cfg, 0, h), f"token {t:.0%} + head {h:.0%}": random_pruned(cfg, t, h)}


INT8_SUFFIX = " int8 (onnxruntime)"


def runtime_table(models: dict[str, TransReID], input_size: tuple[int, int], batch_sizes: list[int], warmup: int,
                  repeats: int, onnx: bool, threads: int | None = None, int8_rows: bool = False) -> list[dict]:
    """compare()'s rows plus AMG's GFLOPs and their ratio; PyTorch rows with fused attention. int8_rows: each
    model also exported and dynamically quantized to INT8 (toolkit.int8), timed under ONNX Runtime."""
    for m in models.values():
        m.use_fused_attention(True)
    with tempfile.TemporaryDirectory() as tmp:
        extra = {}
        for i, (name, m) in enumerate(models.items() if int8_rows else ()):
            fp32 = export_onnx(m, Path(tmp) / f"{i}.onnx", input_size, dynamo=False)
            extra[name + INT8_SUFFIX] = (int8.quantize_dynamic(fp32, Path(tmp) / f"{i}_int8.onnx"), m)
        rows = compare(models, input_size, batch_sizes, torch.device("cpu"), warmup, repeats, threads,
                       onnx_models=tuple(models) if onnx else (), extra_onnx=extra, onnx_dynamo=False)
    amg_gflops = {name: amg.model_amg_macs(m) / 1e9 for name, m in models.items()}
    for row in rows:
        row["amg_gflops"] = amg_gflops[row["model"].removesuffix(INT8_SUFFIX).removesuffix(" (onnxruntime)")]
        row["amg_ratio"] = rows[0]["amg_gflops"] / row["amg_gflops"]
    return rows


def main(args: argparse.Namespace) -> list[dict]:
    cfg = load_config(args.config_file, args.opts)
    if args.int8 and args.no_onnx:
        raise ConfigError("--int8 adds ONNX Runtime rows: it cannot go with --no_onnx")
    if args.int8:
        int8.require_onnx()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = variants(cfg, args)
    size = tuple(cfg.INPUT.SIZE_TEST)
    rows = runtime_table(models, size, args.batch_sizes, args.warmup, args.repeats, not args.no_onnx, args.threads,
                         args.int8)
    print(format_table(rows, args.batch_sizes))
    print("AMG GFLOPs (prunable blocks): " + ", ".join(f"{r['model']} {r['amg_gflops']:.4g}" for r in rows
                                                       if "onnxruntime" not in r["model"]))
    if args.out:
        write_outputs(rows, Path(args.out))
        print(f"wrote {Path(args.out).with_suffix('.csv')} and .json")
    return rows


def get_parser() -> argparse.ArgumentParser:
    p = get_args_parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", action="append", default=[],
                   help="NAME=PATH of a (pruned) TransReID checkpoint; repeat for several rows (default: random "
                        "weights, unpruned / token / head / both)")
    p.add_argument("--token_rate", type=cli.prune_fraction, default=0.25, help="random rows: token slots removed")
    p.add_argument("--head_rate", type=cli.prune_fraction, default=0.25, help="random rows: heads removed")
    p.add_argument("--batch_sizes", type=cli.positive_int_list, default=[1, 32], help="comma-separated batch sizes")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=2, help="untimed runs before timing")
    p.add_argument("--repeats", type=cli.positive_int, default=10, help="timed runs; the median is reported")
    p.add_argument("--threads", type=cli.positive_int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--no_onnx", action="store_true", help="skip the ONNX Runtime rows")
    p.add_argument("--int8", action="store_true",
                   help="also time every model dynamically quantized to INT8 under ONNX Runtime "
                        "(see transreid.quantize)")
    p.add_argument("--out", default=None, help="also write the table as OUT.csv and OUT.json")
    return p


if __name__ == "__main__":
    cli.run_main(main, get_parser().parse_intermixed_args(), (ConfigError, ModelError, QuantizationError))
