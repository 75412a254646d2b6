"""AMG speed: TransReID ViT-B stride 12 (SIE, JPM), 256x128, CPU, batch 1 and 32: unpruned vs token 25 %,
head 25 % and both (random weights and random masks with AMG's counts), PyTorch and (--onnx) ONNX Runtime.

    python benchmarks/bench_amg.py [--threads 2] [--repeats 3] [--onnx]

Goal: realised speed-up >= 0.85 x the whole-model MAC ratio in the same runtime. Printed per row as
"efficiency" = speed-up / MAC ratio.
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402
from runtime_comparison import format_table  # noqa: E402
from transreid.config import load_config  # noqa: E402
from transreid.runtime import random_pruned, runtime_table  # noqa: E402


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(str(ROOT / "transreid/configs/Market/vit_transreid_stride.yml"), [])
    models = {"unpruned": random_pruned(cfg, 0, 0), "token 25%": random_pruned(cfg, 0.25, 0),
              "head 25%": random_pruned(cfg, 0, 0.25), "token 25% + head 25%": random_pruned(cfg, 0.25, 0.25)}
    rows = runtime_table(models, (256, 128), args.batch_sizes, args.warmup, args.repeats, args.onnx, args.threads)
    print(f"{torch.get_num_threads()} threads")
    print(format_table(rows, args.batch_sizes))
    for runtime in ("", " (onnxruntime)"):
        group = [r for r in rows if r["model"].endswith(runtime) and (runtime or "onnxruntime" not in r["model"])]
        if not group:
            continue
        base = group[0]
        for r in group[1:]:
            mac_ratio = base["macs"] / r["macs"]
            eff = ", ".join(f"b{b} {base[f'ms_b{b}'] / r[f'ms_b{b}'] / mac_ratio:.2f}" for b in args.batch_sizes)
            print(f"{r['model']:40s} MAC ratio {mac_ratio:.3f}  AMG ratio {r['amg_ratio']:.3f}  "
                  f"efficiency (speed-up / MAC ratio) {eff}")


if __name__ == "__main__":
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch_sizes", type=cli.positive_int_list, default=[1, 32])
    p.add_argument("--threads", type=cli.positive_int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=1)
    p.add_argument("--repeats", type=cli.positive_int, default=3, help="timed runs per row (median)")
    p.add_argument("--onnx", action="store_true", help="also time every model under ONNX Runtime")
    main(p.parse_args())
