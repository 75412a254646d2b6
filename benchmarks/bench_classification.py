"""Small-model speed of SFP on classification: CIFAR ResNet-56 at keep 0.6 and ImageNet ResNet-50 at keep
0.7, full vs small, CPU, batch 1 and 128 (random weights; the masks are SFP's), timed in turns.

    python benchmarks/bench_classification.py [--threads 2] [--repeats 20] [--onnx]

Reports the MAC ratio (flop_counter) beside the measured speed-up, and the fraction of the MAC ratio that
is realised (the goal is >= 0.85 within one runtime). --onnx also times both under ONNX Runtime.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from classification import flops  # noqa: E402
from classification.models import build_model  # noqa: E402
from classification.sfp import SoftFilterMask, pruned_layers  # noqa: E402
from classification.small import has_constants, inner_only, make_small_model, zero_filters  # noqa: E402
from toolkit import latency  # noqa: E402

CASES = [("resnet56", 0.6, 162, 32, False), ("resnet50", 0.7, 156, 224, True)]


def models(arch: str, rate: float, layer_end: int, skip_downsample: bool) -> tuple[torch.nn.Module, ...]:
    torch.manual_seed(0)
    net = build_model(arch, 10 if arch == "resnet56" else 1000)
    for m in net.modules():  # trained-like BN statistics: pruned channels get non-zero constants
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.bias.data.normal_(0, 0.2)
    layers = pruned_layers(net, 0, layer_end, 3, skip_downsample)
    SoftFilterMask(layers, rate).step(net)
    pruned = zero_filters(net, layers)
    constants = has_constants(net, pruned)
    return (net.eval(), make_small_model(net, pruned, constants).eval(),
            make_small_model(net, inner_only(net, pruned), constants).eval())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per model (median)")
    p.add_argument("--batch_sizes", default="1,128", help="comma-separated batch sizes")
    p.add_argument("--onnx", action="store_true", help="also time both models under ONNX Runtime")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    for arch, rate, end, size, skip in CASES:
        full, small, deploy = models(arch, rate, end, skip)
        ratio = flops.macs(full, size) / flops.macs(small, size)
        deploy_ratio = flops.macs(full, size) / flops.macs(deploy, size)
        print(f"{arch} keep {rate} at {size}x{size}: {flops.macs(full, size) / 1e6:.1f} -> "
              f"{flops.macs(small, size) / 1e6:.1f} M MACs (ratio {ratio:.2f}), params {flops.params(full) / 1e6:.2f}"
              f" -> {flops.params(small) / 1e6:.2f} M; inner-only (deploy) form {flops.macs(deploy, size) / 1e6:.1f}"
              f" M MACs (ratio {deploy_ratio:.2f})", flush=True)
        runners = {}
        with torch.no_grad():
            for b in batches:
                x = torch.randn(b, 3, size, size)
                if b >= 64 and size >= 224:
                    x = x[:32]  # keep ImageNet batches within a reasonable time on 2 cores
                runners[b] = {"full": (lambda m=full, x=x: m(x)), "small": (lambda m=small, x=x: m(x)),
                              "deploy": (lambda m=deploy, x=x: m(x))}
            if args.onnx:
                from toolkit import onnx_export
                tmp = Path(tempfile.mkdtemp())
                sessions = {name: onnx_export.onnx_session(onnx_export.export_onnx(m, tmp / f"{name}.onnx",
                                                                                   (size, size)),
                                                           args.threads, spinning=False)
                            for name, m in (("full", full), ("small", small), ("deploy", deploy))}
                for b in batches:
                    x = torch.randn(min(b, 32 if size >= 224 else b), 3, size, size).numpy()
                    for name, s in sessions.items():
                        runners[b][f"{name} (onnxruntime)"] = (lambda s=s, x=x: s.run(None, {"images": x}))
            for b in batches:
                n = runners[b]
                ms = latency.median_latencies(n, warmup=3, repeats=args.repeats if b == 1 else
                                                         max(3, args.repeats // 4))
                real_b = b if not (b >= 64 and size >= 224) else 32
                line = (f"  batch {real_b}: eager full {ms['full']:.2f} ms, small {ms['small']:.2f} ms = "
                        f"{ms['full'] / ms['small']:.2f}x ({ms['full'] / ms['small'] / ratio:.2f} of its MAC ratio), "
                        f"deploy {ms['deploy']:.2f} ms = {ms['full'] / ms['deploy']:.2f}x "
                        f"({ms['full'] / ms['deploy'] / deploy_ratio:.2f})")
                if args.onnx:
                    f, s, d = (ms[f"{k} (onnxruntime)"] for k in ("full", "small", "deploy"))
                    line += (f"; onnxruntime {f:.2f} -> {s:.2f} ms = {f / s:.2f}x ({f / s / ratio:.2f}), "
                             f"deploy {d:.2f} ms = {f / d:.2f}x ({f / d / deploy_ratio:.2f})")
                print(line, flush=True)


if __name__ == "__main__":
    main()
