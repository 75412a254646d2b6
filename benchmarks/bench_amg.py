"""AMG speed: TransReID ViT-B stride 12 (SIE, JPM), 256x128, CPU, batch 1 and 32: unpruned vs token 25 %,
head 25 % and both (random weights and random masks with AMG's counts), PyTorch and (--onnx) ONNX Runtime.

    python benchmarks/bench_amg.py [--threads 2] [--repeats 3] [--onnx]
    python benchmarks/bench_amg.py --int8 [--batch_sizes 1]   # float32 vs INT8 (dynamic) under ONNX Runtime

Goal: realised speed-up >= 0.85 x the whole-model MAC ratio in the same runtime. Printed per row as
"efficiency" = speed-up / MAC ratio. --int8: the unpruned and the token 25 % + head 25 % model, each exported
as float32 ONNX and dynamically quantized to INT8 (transreid.quantize's default), timed in turns; goals:
INT8 >= 2x its float32 model, pruned INT8 >= 2.5x the unpruned float32 one, feature cosine >= 0.999.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from toolkit import cli  # noqa: E402
from toolkit.latency import format_table  # noqa: E402
from transreid.config import load_config  # noqa: E402
from transreid.runtime import random_pruned, runtime_table  # noqa: E402


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    names = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8", "avx512f", "avx2") if f" {f}" in flags]
    return ", ".join(names) or "none of avx2/avx512/vnni"


def int8_main(args: argparse.Namespace, cfg) -> None:
    from toolkit import int8
    from toolkit.latency import median_latencies
    from toolkit.onnx_export import onnx_feeds, onnx_session
    from transreid.quantize import export_vit
    models = {"unpruned": random_pruned(cfg, 0, 0), "token 25% + head 25%": random_pruned(cfg, 0.25, 0.25)}
    size = (256, 128)
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(8, 3, *size, generator=gen).numpy()
    cams = np.zeros(8, np.int64)
    sessions, cosines = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, m) in enumerate(models.items()):
            fp32 = export_vit(m, Path(tmp) / f"{i}.onnx", size)
            target = Path(tmp) / f"{i}_int8.onnx"
            if args.int8_mode == "dynamic":
                quantized = int8.quantize_dynamic(fp32, target)
            else:  # calibrated on random images: these are random weights anyway
                calib = [{"images": torch.randn(4, 3, *size, generator=gen).numpy(), "cams": np.zeros(4, np.int64)}
                         for _ in range(4)]
                quantized = int8.quantize_static(fp32, target, calib, op_types=int8.MATRIX_OPS)
            pair = [onnx_session(path, args.threads, spinning=False) for path in (fp32, quantized)]
            a, b = (s.run(None, onnx_feeds(s, probe, cams))[0] for s in pair)
            cosines[name] = float(int8.feature_cosine(a, b).min())
            sessions[f"{name} float32"], sessions[f"{name} INT8"] = pair
    print(f"{args.threads or torch.get_num_threads()} threads; CPU flags: {cpu_flags()}; INT8 {args.int8_mode}")
    for b in args.batch_sizes:
        x = torch.randn(b, 3, *size, generator=gen).numpy()
        fns = {name: (lambda s=s: s.run(None, onnx_feeds(s, x))) for name, s in sessions.items()}
        ms = median_latencies(fns, args.warmup, args.repeats)
        base = ms["unpruned float32"]
        for name, t in ms.items():
            print(f"b{b:<3d} {name:34s} {t:9.1f} ms  {base / t:5.2f}x the unpruned float32")
        for name in models:
            print(f"b{b:<3d} {name}: INT8 {ms[name + ' float32'] / ms[name + ' INT8']:.2f}x its float32, "
                  f"min feature cosine {cosines[name]:.5f}")


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(str(ROOT / "transreid/configs/Market/vit_transreid_stride.yml"), [])
    if args.int8:
        return int8_main(args, cfg)
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
    p.add_argument("--int8", action="store_true", help="float32 vs INT8 ONNX Runtime rows only (see above)")
    p.add_argument("--int8_mode", choices=["dynamic", "static"], default="dynamic",
                   help="--int8: transreid.quantize's --mode")
    main(p.parse_args())
