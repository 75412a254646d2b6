"""Latency tables: medians of runs timed in turns, ratios to the first row, the printed table, CSV and JSON."""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import model as model_lib
from toolkit import features, onnx_export, utils
from toolkit.atomic_io import write_csv_atomic, write_text_atomic


def median_latencies(fns: dict[str, Callable[[], object]], warmup: int, repeats: int,
                     sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median wall time of each fn() in milliseconds, timed in turns (one run of each per round), so
    that load drifting on a shared machine during the measurement affects all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def add_ratios(rows: list[dict], batch_sizes: list[int]) -> list[dict]:
    """MAC ratio and measured speed-up of every row relative to the first one (in place)."""
    base = rows[0]
    for row in rows:
        row["mac_ratio"] = base["macs"] / row["macs"]
        for b in batch_sizes:
            row[f"speedup_b{b}"] = base[f"ms_b{b}"] / row[f"ms_b{b}"]
    return rows


OPTIONAL_COLUMNS = (("size_mb", "size (MB)", "{:9.2f}"), ("cosine", "cosine", "{:7.4f}"), ("mAP", "mAP", "{:6.3f}"),
                    ("R1", "R1", "{:6.3f}"), ("mINP", "mINP", "{:6.3f}"))


def format_table(rows: list[dict], batch_sizes: list[int]) -> str:
    """Params, MACs, MAC ratio, then file size and accuracy where the rows have them, then latencies."""
    extra = [c for c in OPTIONAL_COLUMNS if any(c[0] in r for r in rows)]
    width = max(26, *(len(r["model"]) for r in rows))
    head = f"{'model':{width}s} {'params (M)':>10s} {'GMACs':>8s} {'MAC ratio':>9s}" + "".join(
        f" {title:>{len(fmt.format(0))}s}" for _, title, fmt in extra) + "".join(
        f" {'b' + str(b) + ' ms':>9s} {'speed-up':>8s}" for b in batch_sizes)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(" " + (fmt.format(r[key]) if key in r else " " * len(fmt.format(0))) for key, _, fmt in extra)
        lines.append(f"{r['model']:{width}s} {r['params'] / 1e6:10.3f} {r['macs'] / 1e9:8.4f} {r['mac_ratio']:9.2f}"
                     + cells + "".join(f" {r[f'ms_b{b}']:9.2f} {r[f'speedup_b{b}']:8.2f}" for b in batch_sizes))
    return "\n".join(lines)


def write_outputs(rows: list[dict], stem: Path) -> None:
    write_csv_atomic(rows, None, stem.with_suffix(".csv"))  # rows may lack optional columns
    write_text_atomic(json.dumps(rows, indent=2), stem.with_suffix(".json"))


def compare(models: dict[str, torch.nn.Module], input_size: tuple[int, int], batch_sizes: list[int],
            device: torch.device, warmup: int, repeats: int, onnx_threads: int | None = None,
            onnx_models: tuple[str, ...] = (), extra_onnx: dict[str, tuple[Path, torch.nn.Module]] | None = None,
            test_dir: str | Path | None = None, onnx_dynamo: bool = True) -> list[dict]:
    """One row per model, per model named in onnx_models also run under ONNX Runtime, and per ready ONNX
    file in extra_onnx ({row name: (path, the model it computes)}, e.g. an INT8 one): params, MACs, MAC
    ratio, size of the ONNX files, mAP and Rank-1 on test_dir (when given) and latency per batch size.
    MAC ratio and speed-up are relative to the first model. All rows of one batch size are timed in turns."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows, runners, feature_fns = [], {}, {}
    inputs = {b: torch.randn(b, 3, *input_size, device=device) for b in batch_sizes}

    def add_onnx(name: str, path: Path, net: torch.nn.Module) -> None:
        # no spinning: idle worker threads of one session would take the cores from the next one timed
        session = onnx_export.onnx_session(path, onnx_threads, spinning=False)
        rows.append({"model": name, "params": model_lib.inference_params(net),
                     "macs": utils.count_macs(net, input_size), "size_mb": path.stat().st_size / 1e6})
        runners[name] = {b: (lambda x=x.cpu().numpy(): session.run(None, {"images": x})) for b, x in inputs.items()}
        feature_fns[name] = lambda images: onnx_export.onnx_features(session, images)

    for name, net in models.items():
        net = net.eval().to(device)
        rows.append({"model": name, "params": model_lib.inference_params(net),
                     "macs": utils.count_macs(net, input_size)})
        runners[name] = {b: (lambda net=net, x=x: net.extract(x)) for b, x in inputs.items()}
        feature_fns[name] = lambda images, net=net, name=name: features.extract_features(net, images, device, 64, 0,
                                                                                       name)
    with tempfile.TemporaryDirectory() as tmp:
        for name in onnx_models:
            path = onnx_export.export_onnx(models[name], Path(tmp) / f"{len(rows)}.onnx", input_size, onnx_dynamo)
            add_onnx(f"{name} (onnxruntime)", path, models[name])
        for name, (path, net) in (extra_onnx or {}).items():
            add_onnx(name, Path(path), net)
        if test_dir is not None:
            for row in rows:
                row.update(features.reid_accuracy(feature_fns[row["model"]], test_dir, input_size))
        with torch.inference_mode():
            for b in batch_sizes:
                ms = median_latencies({name: fns[b] for name, fns in runners.items()}, warmup, repeats, sync)
                for row in rows:
                    row[f"ms_b{b}"] = ms[row["model"]]
    return add_ratios(rows, batch_sizes)
