"""ONNX export of a model's feature extractor (opset 18, dynamic batch), checked under ONNX Runtime."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from model import ModelError

OPSET = 18  # the dynamo exporter implements opset >= 18 (the issue asks >= 17)


class FeatureExtractor(nn.Module):
    """forward(images) -> the re-ID network's L2-normalised features (`extract`), or a classifier's
    logits: what is exported and timed."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.net, "extract", self.net)(x)


def add_exporter_argument(parser) -> None:
    """--onnx_exporter for scripts that export: the default dynamo graphs run faster, legacy exports faster."""
    parser.add_argument("--onnx_exporter", choices=["dynamo", "legacy"], default="dynamo",
                        help="torch's ONNX exporter: dynamo (default; its graph of the small model runs faster under "
                             "ONNX Runtime) or legacy (about 10x quicker to export, same results)")


def export_onnx(net: nn.Module, path: str | os.PathLike, input_size: tuple[int, int], dynamo: bool = True) -> Path:
    """Write `net`'s feature extractor as ONNX with a dynamic batch axis (input 'images', output 'features').

    By default with torch's dynamo exporter: the legacy exporter turns the small CNN's channel scatter into
    an op that ONNX Runtime runs several times slower. dynamo=False uses the legacy (TorchScript) exporter,
    about 10x quicker to export and as fast to run for a ViT's plain GEMMs and gathers."""
    try:
        import onnxscript  # noqa: F401 (the exporter needs it)
    except ImportError:
        raise ModelError("ONNX export needs the packages onnx and onnxscript "
                         "(pip install -r requirements.txt)") from None
    extractor = FeatureExtractor(net).eval().cpu()
    x = torch.zeros(2, 3, *input_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not dynamo:
            torch.onnx.export(extractor, (x,), str(path), dynamo=False, opset_version=OPSET, input_names=["images"],
                              output_names=["features"], dynamic_axes={"images": {0: "batch"}})
            return path
        program = torch.onnx.export(extractor, (x,), dynamo=True, opset_version=OPSET, input_names=["images"],
                                    output_names=["features"], verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
        program.save(str(path))
    return path


def onnx_session(path: str | os.PathLike, threads: int | None = None, spinning: bool = True):
    """An ONNX Runtime CPU session, or None when onnxruntime is not installed. spinning=False stops idle
    worker threads from busy-waiting (needed when several sessions are timed in turns)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_max_difference(net: nn.Module, path: str | os.PathLike, input_size: tuple[int, int]) -> float | None:
    """Largest absolute difference between PyTorch and ONNX Runtime features (None without onnxruntime)."""
    session = onnx_session(path)
    if session is None:
        return None
    x = torch.randn(3, 3, *input_size, generator=torch.Generator().manual_seed(1))
    net = net.eval().cpu()
    with torch.no_grad():
        expected = FeatureExtractor(net)(x).numpy()
    got = session.run(None, {"images": x.numpy()})[0]
    return float(abs(got - expected).max())


def onnx_features(session, dataset: Dataset, batch_size: int = 64) -> torch.Tensor:
    """f(x) + f(flip(x)), L2-normalised, as test.py computes them, but from an ONNX Runtime session."""
    out = []
    for imgs in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        f = sum(session.run(None, {"images": x.numpy()})[0] for x in (imgs, imgs.flip(3)))
        out.append(F.normalize(torch.from_numpy(f), dim=1))
    return torch.cat(out)
