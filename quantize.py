"""INT8 quantization of a (small) re-ID model for CPU inference: post-training static quantization with
calibration on training images, and quantization-aware training (QAT), both exported to ONNX.

    python quantize.py --checkpoint results/ft_resnet18/iter/round_2/net_last.pth \\
        --data_dir ./datasets/Market/pytorch --train_all --out results/int8            # PTQ only
    python quantize.py ... --Epochs 3 --lr 0.001                                         # + QAT fine-tuning

Why ONNX Runtime and not torch.ao: torch's eager quantization flow is deprecated, and ONNX Runtime's
static quantization (QDQ, per-channel symmetric INT8 weights, UINT8 activations calibrated by min/max)
runs on any x86/ARM CPU through one file. QAT fine-tunes the float model with fake quantization that
matches that scheme (weights: per output channel, symmetric, [-127, 127]; conv inputs: per tensor,
UINT8, moving min/max), then the same ONNX Runtime quantizer converts it. Per-channel symmetric
quantization commutes with the per-channel BN scale folded in at export, so the weights QAT trained
against are exactly the INT8 weights ONNX Runtime writes.

Writes fp32.onnx, int8_ptq.onnx (and qat/ + int8_qat.onnx) to --out, and prints and saves
(quantization.csv / .json) the runtime_comparison table: mAP and Rank-1 on --test_dir, file size and
batch-1 CPU latency, float32 against INT8.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from pruner import PruneError
from toolkit import cli, data, int8, onnx_export, surgery, train_loop, utils
from toolkit.int8 import QuantizationError, calibration_batches, quantize_onnx  # noqa: F401
from toolkit.latency import compare, format_table, write_outputs
from toolkit.layouts import DatasetError
from toolkit.surgery import load_small_model, make_deploy_model

WEIGHT_QMAX = 127  # symmetric INT8 weights: [-127, 127], as ONNX Runtime's quantizer uses
ACT_QMIN, ACT_QMAX = 0, 255  # UINT8 activations (the fast U8S8 path on x86)


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime static quantization (toolkit.int8)


def cosine_similarity(session_a, session_b, images: np.ndarray) -> np.ndarray:
    """Per-image cosine similarity of two sessions' features."""
    return int8.feature_cosine(*(s.run(None, {"images": images})[0] for s in (session_a, session_b)))


# ---------------------------------------------------------------------------------------------------------------
# Quantization-aware training: fake quantization matching the scheme above


class WeightFakeQuant(nn.Module):
    """Parametrization of a conv weight: per-output-channel symmetric INT8 round trip (straight-through)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale = w.detach().flatten(1).abs().amax(1).clamp(min=1e-12) / WEIGHT_QMAX
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -WEIGHT_QMAX, WEIGHT_QMAX)


class InputFakeQuant(nn.Module):
    """A conv's input through a UINT8 round trip whose range follows a moving min/max (training) or is
    frozen (eval); the range always contains 0, as ONNX Runtime's asymmetric ranges do. Identity until
    a training-mode batch has set the range."""

    def __init__(self, momentum: float = 0.01):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            lo, hi = x.detach().min().clamp(max=0), x.detach().max().clamp(min=0)
            if self.seen:
                lo, hi = torch.lerp(self.lo, lo, self.momentum), torch.lerp(self.hi, hi, self.momentum)
            self.lo.copy_(lo)
            self.hi.copy_(hi)
            self.seen.fill_(True)
        elif not self.seen:  # no range observed yet: nothing to imitate
            return x
        scale = ((self.hi - self.lo) / (ACT_QMAX - ACT_QMIN)).clamp(min=1e-8)
        zero = (ACT_QMIN - torch.round(self.lo / scale)).clamp(ACT_QMIN, ACT_QMAX).int()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, ACT_QMIN, ACT_QMAX)


def prepare_qat(net: nn.Module) -> nn.Module:
    """Fake quantization on every conv's weight and input, in place; returns `net`."""
    for conv in [m for m in net.modules() if isinstance(m, nn.Conv2d)]:
        parametrize.register_parametrization(conv, "weight", WeightFakeQuant())
        conv.input_quant = InputFakeQuant()
        conv.register_forward_pre_hook(lambda mod, args: (mod.input_quant(args[0]),) + tuple(args[1:]))
    return net


def float_state_dict(net: nn.Module) -> dict:
    """The float weights of a QAT model under the plain model's keys (fake-quant state dropped)."""
    state = {}
    for key, value in net.state_dict().items():
        if ".input_quant." in key:
            continue
        state[key.replace(".parametrizations.weight.original", ".weight")] = value.detach().clone()
    return state


class FloatWeights(train_loop.EpochEndHook):
    """Saves QAT checkpoints as plain small-model state dicts (loadable by test.py and this script)."""

    def weights_to_save(self, net: nn.Module, epoch: int, last: bool) -> dict:
        return float_state_dict(net)


# ---------------------------------------------------------------------------------------------------------------
# The script


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="a small-model checkpoint (test_small.py, iterative_compress.py), or a zeroed or full "
                        "ft_net one (its all-zero filters are removed first)")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint>_int8/ beside it)")
    p.add_argument("--test_dir", default=None,
                   help="dataset whose query/gallery give mAP and Rank-1 (default: the first --data_dir)")
    p.add_argument("--calib_images", type=cli.positive_int, default=256, help="training images used for calibration")
    p.add_argument("--reduce_range", action="store_true",
                   help="7-bit weights: avoids U8S8 saturation on x86 CPUs without VNNI, if accuracy drops")
    p.add_argument("--threads", type=cli.positive_int, default=None, help="CPU threads for ONNX Runtime timing")
    p.add_argument("--repeats", type=cli.positive_int, default=30, help="timed batch-1 runs (the median is reported)")
    onnx_export.add_exporter_argument(p)
    train_loop.add_training_args(p, lr=0.001, help_overrides={
        **train_loop.PIPELINE_UNUSED_FLAGS, "--prune_rate": "not used",
        "--Epochs": "quantization-aware fine-tuning epochs (0: post-training quantization only)",
        "--resume": "continue an interrupted QAT fine-tuning in OUT/qat/",
        "--overwrite": "write into an --out folder that already holds results, replacing them"}, zero_epochs=True)
    p.set_defaults(Epochs=0, milestones="", save_epoch=10 ** 9, name="qat")
    return p


def qat_finetune(small: nn.Module, args: argparse.Namespace, out: Path) -> nn.Module:
    """Fine-tune a copy of `small` with fake quantization for args.Epochs epochs; returns the float model."""
    def build(a: argparse.Namespace, num_classes: int) -> nn.Module:
        net = train_loop.fit_classifier(copy.deepcopy(small), num_classes)
        return prepare_qat(net)
    args = argparse.Namespace(**vars(args))
    args.network_arch, args.out_dir = small.arch, str(out / "qat")
    trained = train_loop.train(args, make_hook=lambda net, a: FloatWeights(), build_model=build, method="qat")
    return surgery.model_from_state_dict(float_state_dict(trained))


def main(args: argparse.Namespace) -> list[dict]:
    int8.require_onnx()
    out = Path(args.out or Path(args.checkpoint).with_suffix("").as_posix() + "_int8")
    cli.refuse_existing_output(out, args.overwrite, args.resume, "continue its QAT fine-tuning")
    small = load_small_model(args.checkpoint).eval()
    size = (args.height, args.width)
    out.mkdir(parents=True, exist_ok=True)
    roots = data.training_dirs(args.data_dir, args.train_all)
    test_dir = Path(args.test_dir or args.data_dir.split(",")[0])
    batches = calibration_batches(roots, args.calib_images, size, seed=args.seed)
    deploy = make_deploy_model(small)  # the fastest form, same features (see small_model.py)
    dynamo = args.onnx_exporter == "dynamo"
    fp32 = onnx_export.export_onnx(deploy, out / "fp32.onnx", size, dynamo)
    models = [("small fp32 (onnxruntime)", fp32, deploy),
              ("small int8 PTQ (onnxruntime)", quantize_onnx(fp32, out / "int8_ptq.onnx", batches, args.reduce_range),
               deploy)]
    if args.Epochs > 0:
        tuned = make_deploy_model(qat_finetune(small, args, out).eval())
        qat_fp32 = onnx_export.export_onnx(tuned, out / "qat_fp32.onnx", size, dynamo)
        models.append(("small int8 QAT (onnxruntime)",
                       quantize_onnx(qat_fp32, out / "int8_qat.onnx", batches, args.reduce_range), tuned))
    rows = compare({}, size, [1], torch.device("cpu"), 5, args.repeats, args.threads,
                                      extra_onnx={name: (path, net) for name, path, net in models}, test_dir=test_dir)
    print(f"{args.checkpoint}: {small.arch} at {size[0]}x{size[1]}, CPU batch 1, calibrated on "
          f"{sum(len(b) for b in batches)} training images")
    print(format_table(rows, [1]))
    write_outputs(rows, out / "quantization")
    print(f"wrote {out}/quantization.csv and .json")
    return rows


if __name__ == "__main__":
    utils.run_main(main, get_args_parser().parse_args(),
                   train_loop.USER_ERRORS + (QuantizationError, PruneError, DatasetError))
