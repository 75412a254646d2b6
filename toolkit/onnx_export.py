"""ONNX export of a model's feature extractor (opset 18, dynamic batch), checked under ONNX Runtime."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from model import ModelError

OPSET = 18  # the dynamo exporter implements opset >= 18 (the issue asks >= 17)


class FeatureExtractor(nn.Module):
    """forward(images[, cams]) -> the re-ID network's features (`extract`), or a classifier's logits: what is
    exported and timed. cams: the camera of each image, for a ViT with a camera embedding (SIE)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, cams: torch.Tensor | None = None) -> torch.Tensor:
        if cams is not None:
            return self.net.extract(x, cams)
        return getattr(self.net, "extract", self.net)(x)


def onnx_feeds(session, images: np.ndarray, cams: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The inputs of one run: the images, and the cameras (0 when not given) where the graph takes them."""
    feeds = {"images": images}
    if any(i.name == "cams" for i in session.get_inputs()):
        feeds["cams"] = (np.zeros(len(images)) if cams is None else np.asarray(cams)).astype(np.int64)
    return feeds


def add_exporter_argument(parser) -> None:
    """--onnx_exporter for scripts that export: the default dynamo graphs run faster, legacy exports faster."""
    parser.add_argument("--onnx_exporter", choices=["dynamo", "legacy"], default="dynamo",
                        help="torch's ONNX exporter: dynamo (default; its graph of the small model runs faster under "
                             "ONNX Runtime) or legacy (about 10x quicker to export, same results)")


def export_onnx(net: nn.Module, path: str | os.PathLike, input_size: tuple[int, int], dynamo: bool = True,
                cameras: bool = False) -> Path:
    """Write `net`'s feature extractor as ONNX with a dynamic batch axis (input 'images', output 'features';
    with cameras a second input 'cams', int64 per image, exported with the legacy exporter).

    By default with torch's dynamo exporter: the legacy exporter turns the small CNN's channel scatter into
    an op that ONNX Runtime runs several times slower. dynamo=False uses the legacy (TorchScript) exporter,
    about 10x quicker to export and as fast to run for a ViT's plain GEMMs and gathers."""
    if dynamo and not cameras:
        try:
            import onnxscript  # noqa: F401 (the dynamo exporter needs it; the legacy one does not)
        except ImportError:
            raise ModelError("ONNX export needs the packages onnx and onnxscript "
                             "(pip install -r requirements.txt)") from None
    extractor = FeatureExtractor(net).eval().cpu()
    x = torch.zeros(2, 3, *input_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cameras or not dynamo:
            inputs, names = ((x, torch.zeros(2, dtype=torch.long)), ["images", "cams"]) if cameras else \
                ((x,), ["images"])
            torch.onnx.export(extractor, inputs, str(path), dynamo=False, opset_version=OPSET, input_names=names,
                              output_names=["features"], dynamic_axes={n: {0: "batch"} for n in names})
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
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, *input_size, generator=gen)
    feeds = onnx_feeds(session, x.numpy())
    cams = None
    if "cams" in feeds:  # cameras of the model's embedding, at random
        cams = torch.randint(0, max(net.camera_num, 1), (3,), generator=gen)
        feeds["cams"] = cams.numpy()
    net = net.eval().cpu()
    with torch.no_grad():
        expected = FeatureExtractor(net)(x, cams).numpy()
    got = session.run(None, feeds)[0]
    return float(abs(got - expected).max())


def onnx_features(session, dataset: Dataset, batch_size: int = 64) -> torch.Tensor:
    """f(x) + f(flip(x)), L2-normalised, as test.py computes them, but from an ONNX Runtime session."""
    out = []
    for imgs in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        f = sum(session.run(None, {"images": x.numpy()})[0] for x in (imgs, imgs.flip(3)))
        out.append(F.normalize(torch.from_numpy(f), dim=1))
    return torch.cat(out)
