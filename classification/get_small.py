"""Turn an SFP checkpoint (a network with zero filters) into the physically smaller network.

    python -m classification.get_small --resume ./snapshots/resnet50-rate-0.7/checkpoint.pth \\
        --save_dir ./snapshots/resnet50-small [--export_onnx small.onnx]

The small model equals the one with zeros (eval mode, checked here to 1e-5 relative) for every arch,
with or without --prune_bn: the constant outputs of pruned channels are carried over (see small.py).
It is saved as small.pth, which loads without the full checkpoint (classification.small.load_small).
"""
import argparse
from pathlib import Path

import torch

from classification import engine, flops
from classification.small import load_small, small_checkpoint
from toolkit import cli, utils

TOLERANCE = 1e-5


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resume", required=True, help="checkpoint.pth or model_best.pth of an SFP run")
    p.add_argument("--save_dir", required=True, help="where small.pth (and small.json) are written")
    p.add_argument("--export_onnx", default=None, metavar="PATH", help="also export the small model as ONNX")
    p.add_argument("--deploy", action="store_true",
                   help="remove only inner convs' filters; residual-stream convs keep their zero filters at full "
                        "width (fewer MACs saved, but no channel scatter: faster under ONNX Runtime)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing small.pth in --save_dir")
    return p


def max_relative_difference(a: torch.nn.Module, b: torch.nn.Module, size: int) -> float:
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    return float((ya - yb).abs().max() / ya.abs().max().clamp(min=1))


def main(args: argparse.Namespace) -> dict:
    out = Path(args.save_dir) / "small.pth"
    cli.check_outputs({"small.pth in --save_dir": out, "--export_onnx": args.export_onnx}, {"--resume": args.resume},
                      args.overwrite)
    state = engine.load_checkpoint(args.resume)
    net, small, pruned, with_constants = engine.shrink(state, args.resume, args.deploy)
    size = state.get("image_size", 32)
    diff = max_relative_difference(net, small, size)
    if not diff <= TOLERANCE:  # NaN never passes
        raise engine.TrainingError(f"the small model differs from the one with zeros by {diff:.2e} (> {TOLERANCE})")
    ckpt = small_checkpoint(state["arch"], state["num_classes"], net, small, pruned, with_constants)
    utils.save_atomic(ckpt, out)
    reloaded = load_small(torch.load(out, map_location="cpu", weights_only=True)).eval()
    full_macs, small_macs = flops.macs(net, size), flops.macs(small, size)
    paper = flops.paper_reduction(state["arch"], state.get("rate", 1.0))
    print(f"{args.resume}: {state['arch']}, {sum(len(i) for i in pruned.values())} filters removed from "
          f"{len(pruned)} convs; max |small - zeros| / max |out| = {diff:.1e}")
    print(f"  params {flops.params(net) / 1e6:.3f} M -> {flops.params(small) / 1e6:.3f} M; MACs at {size}x{size} "
          f"{full_macs / 1e6:.2f} M -> {small_macs / 1e6:.2f} M ({100 * (1 - small_macs / full_macs):.1f}% fewer)"
          + (f"; the paper's formula: {100 * paper:.1f}% fewer" if paper is not None else ""))
    print(f"saved {out} (loads alone: max |reloaded - small| = "
          f"{max_relative_difference(small, reloaded, size):.1e})")
    if args.export_onnx:
        from toolkit import onnx_export
        path = onnx_export.export_onnx(small, args.export_onnx, (size, size))
        onnx_diff = onnx_export.onnx_max_difference(small, path, (size, size))
        print(f"exported {path}" + ("" if onnx_diff is None else f": max |onnx - torch| {onnx_diff:.2e}"))
    return {"difference": diff, "macs": full_macs, "small_macs": small_macs, "paper_reduction": paper}


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args(), engine.USER_ERRORS)
