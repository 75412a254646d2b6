"""INT8 quantization of ONNX models with ONNX Runtime: one module for the CNNs (quantize.py, runtime_comparison.py)
and the transformers (transreid.quantize, transreid.runtime --int8).

- static: QDQ, per-channel symmetric INT8 weights, UINT8 activations with ranges calibrated by min/max on
  training images (the CNN scheme; for a ViT only the MatMul/Gemm/Conv inputs are quantized, so LayerNorm,
  Softmax and GELU stay in float);
- dynamic: INT8 weights of every MatMul/Gemm, activations quantized on the fly per batch (no calibration).
"""
from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from toolkit.atomic_io import atomic_path
from toolkit.errors import UserError

MODES = ("dynamic", "static")
MATRIX_OPS = ["MatMul", "Gemm", "Conv"]


class QuantizationError(UserError):
    """A user-facing problem (missing onnxruntime, no calibration images); printed as one line."""


def onnx_available(dynamo_exporter: bool = True) -> bool:
    """onnxruntime and onnx, and onnxscript for torch's dynamo exporter (the legacy one needs none)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        if dynamo_exporter:
            import onnxscript  # noqa: F401
        return True
    except ImportError:
        return False


def require_onnx(dynamo_exporter: bool = True) -> None:
    if not onnx_available(dynamo_exporter):
        raise QuantizationError("INT8 quantization needs onnxruntime and onnx" +
                                (" and onnxscript" if dynamo_exporter else "") + " (pip install -r requirements.txt)")


@contextmanager
def quiet_quantizer() -> Iterator[None]:
    """The quantizer logs a warning per 1-d weight without a channel axis (BN necks): not the user's concern."""
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_static(fp32_path: Path, int8_path: Path, batches: list[dict[str, np.ndarray]],
                    reduce_range: bool = False, op_types: list[str] | None = None) -> Path:
    """Static INT8 quantization (QDQ, per-channel weights, min/max calibration on `batches` of input feeds).

    op_types: the operators whose inputs are quantized (default: all that ONNX Runtime supports)."""
    require_onnx()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(batches)

        def get_next(self):
            return next(self.feeds, None)

    if not batches:
        raise QuantizationError("no calibration images (--calib_images must be at least 1)")
    with quiet_quantizer(), tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"  # BN folded into the convs, graph optimised
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        with atomic_path(int8_path) as tmp_out:
            ort_quantize_static(str(prepared), str(tmp_out), Reader(), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                reduce_range=reduce_range, op_types_to_quantize=op_types)
    return int8_path


def quantize_dynamic(fp32_path: Path, int8_path: Path) -> Path:
    """Dynamic INT8 quantization: int8 weights of every MatMul/Gemm, activations quantized at run time."""
    require_onnx()
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic
    with quiet_quantizer(), atomic_path(int8_path) as tmp_out:
        ort_quantize_dynamic(str(fp32_path), str(tmp_out), op_types_to_quantize=["MatMul", "Gemm"],
                             weight_type=QuantType.QInt8)
    return int8_path


def feature_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of two feature matrices (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(norms, 1e-12)


def calibration_batches(roots: list[Path], n_images: int, size: tuple[int, int], batch: int = 16,
                        seed: int = 0) -> list[np.ndarray]:
    """`n_images` training images (a seeded random choice over all roots), test-transformed, in batches."""
    import torch

    from toolkit import data
    dataset = data.AnchorPositives(roots, data.test_transform(size))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n_images].tolist()
    images = [dataset.transform(data.load_rgb(dataset.samples[i][0])) for i in order]
    return [torch.stack(images[s:s + batch]).numpy() for s in range(0, len(images), batch)]


def quantize_onnx(fp32_path: Path, int8_path: Path, batches: list[np.ndarray], reduce_range: bool = False) -> Path:
    """Static INT8 quantization (QDQ, per-channel weights) of a CNN's ONNX model, calibrated on `batches`."""
    return quantize_static(fp32_path, int8_path, [{"images": x} for x in batches], reduce_range)
