"""Small-model speed: ft_net ResNet-50 with BAFD masks (prune_rate 0.9, max_lrate 0.95, knn 2), CPU, batch 1.

    python benchmarks/bench_small.py [--threads 2] [--repeats 30]

Target: measured speed-up of the small model over the full model >= 0.85 x the theoretical MAC ratio.
Reported for PyTorch eager, ONNX Runtime and (--compile) torch.compile, each for the small model and its
deployment form (small_model.make_deploy_model: channels padded to multiples of 8 with zero filters,
bottleneck outputs kept dense instead of scattered), and across runtimes. Models are timed in turns.
"""
import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model as model_lib  # noqa: E402
import pruner  # noqa: E402
from model import ft_net  # noqa: E402
from toolkit import latency, utils  # noqa: E402
from toolkit.int8 import onnx_available  # noqa: E402
from toolkit.surgery import make_deploy_model, make_small_model, max_feature_difference  # noqa: E402


class DownsampleOnly(nn.Module):
    """A residual block with its pruned branch taken out: relu(identity or downsample(x))."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.downsample = block.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x if self.downsample is None else self.downsample(x))


def unpruned_part(deploy: nn.Module) -> nn.Module:
    """The deploy model without the branches of layers 2-4 (where BAFD prunes ~97 %): what is left (stem,
    layer1, downsample convs) bounds the small model's time from below, whatever the pruned convs cost."""
    part = copy.deepcopy(deploy)
    for name in ("layer2", "layer3", "layer4"):
        layer = getattr(part.model, name)
        for i in range(len(layer)):
            layer[i] = DownsampleOnly(layer[i])
    return part


def compiled_rows(models: dict, repeats: int) -> list[dict]:
    """Batch-1 latency of each model's feature extractor compiled by inductor with frozen weights
    (the compiled models timed in turns)."""
    import torch._inductor.config as inductor_config

    from toolkit.onnx_export import FeatureExtractor
    inductor_config.freezing = True  # constant-folds BN into the convs and prepacks the weights
    x = torch.randn(1, 3, 256, 128)
    compiled = {f"{name} (compiled)": torch.compile(FeatureExtractor(net).eval()) for name, net in models.items()}
    with torch.inference_mode():
        ms = latency.median_latencies({name: (lambda c=c: c(x)) for name, c in compiled.items()}, 5, repeats)
    return [{"model": f"{name} (compiled)", "params": model_lib.inference_params(net),
             "macs": utils.count_macs(net, (256, 128)), "ms_b1": ms[f"{name} (compiled)"]}
            for name, net in models.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per model (median)")
    p.add_argument("--compile", action="store_true",
                   help="also time both models compiled by torch.compile (inductor, frozen weights; ~1 min to compile)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = ft_net(751, "resnet50").eval()
    rates = pruner.bafd_layer_rates(net, "resnet50", 0.9, 0.95, 2)
    mask = pruner.FilterMask("resnet50", rates, "bafd", 2, efficient=True)
    mask.select(net)
    mask.apply(net, 0.0)
    small = make_small_model(net)
    deploy = make_deploy_model(small)
    for name, m in (("small", small), ("small deploy", deploy)):
        print(f"max |{name} - zeroed| feature difference {max_feature_difference(net, m, (256, 128)):.2e}")
    models = {"full": net, "small": small, "small deploy": deploy}
    onnx = tuple(models) + ("unpruned part",) if onnx_available() else ()
    if onnx:
        models["unpruned part"] = unpruned_part(deploy)
    rows = latency.compare(models, (256, 128), [1], torch.device("cpu"),
                                      warmup=5, repeats=args.repeats, onnx_threads=args.threads, onnx_models=onnx)
    if args.compile:
        rows += compiled_rows({"full": net, "small deploy": deploy}, args.repeats)
        latency.add_ratios(rows, [1])
    print(f"CPU, {torch.get_num_threads()} threads, batch 1, 3x256x128")
    print(latency.format_table(rows, [1]))
    by = {r["model"]: r for r in rows}
    ratio = by["small"]["mac_ratio"]  # the pruned network's ratio (the deploy form computes a few zeros more)
    pairs = [("PyTorch eager", "full", "small"), ("PyTorch eager, deploy form", "full", "small deploy")]
    if args.compile:
        pairs += [("torch.compile, deploy form", "full (compiled)", "small deploy (compiled)"),
                  ("PyTorch eager full -> compiled small", "full", "small deploy (compiled)")]
    if onnx:
        pairs += [("ONNX Runtime", "full (onnxruntime)", "small (onnxruntime)"),
                  ("ONNX Runtime, deploy form", "full (onnxruntime)", "small deploy (onnxruntime)"),
                  ("PyTorch full -> ONNX Runtime small", "full", "small deploy (onnxruntime)")]
        bound = by["full (onnxruntime)"]["ms_b1"] / by["unpruned part (onnxruntime)"]["ms_b1"]
        print(f"Bound: if layers 2-4's pruned branches cost nothing, ONNX Runtime could reach {bound:.2f}x "
              f"= {bound / ratio:.2f} of the MAC ratio (stem, layer1 and downsample convs alone)")
    for label, a, b in pairs:
        speedup = by[a]["ms_b1"] / by[b]["ms_b1"]
        verdict = "meets" if speedup >= 0.85 * ratio else "misses"
        print(f"{label}: speed-up {speedup:.2f}x = {speedup / ratio:.2f} of the MAC ratio {ratio:.2f} "
              f"({verdict} the 0.85 target)")


if __name__ == "__main__":
    main()
