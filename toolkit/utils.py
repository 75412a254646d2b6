"""Small helpers shared by the scripts: devices, seeds, atomic writes, options, model cost."""
from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from toolkit.atomic_io import atomic_path, savemat_atomic, write_csv_atomic, write_text_atomic  # noqa: F401
from toolkit.cli import UsageError, fail, run_main  # noqa: F401  (re-exported)


def parse_gpu_ids(gpu_ids: str) -> list[int]:
    """'0' -> [0], '0,1' -> [0, 1]; '' and '-1' mean the CPU."""
    parts = [i.strip() for i in str(gpu_ids).split(",") if i.strip() not in ("", "-1")]
    if not all(p.isdigit() for p in parts):
        raise UsageError(f"--gpu_ids must be GPU numbers such as 0 or 0,1 (or -1 for the CPU), got {gpu_ids!r}")
    return [int(p) for p in parts]


def select_device(gpu_ids: str) -> torch.device:
    """The first of `--gpu_ids` when CUDA is present (an error if that GPU does not exist), else the
    CPU, with a note when GPUs were asked for."""
    ids = parse_gpu_ids(gpu_ids)
    if not ids:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        print(f"note: CUDA is not available, running on the CPU (--gpu_ids {gpu_ids} not used)")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if max(ids) >= count:
        raise UsageError(f"--gpu_ids {gpu_ids}: this machine has {count} GPU(s), numbered 0 to {count - 1}")
    if len(ids) > 1:
        print(f"note: one process uses one GPU (cuda:{ids[0]}); for several GPUs launch with torchrun")
    torch.cuda.set_device(ids[0])
    return torch.device("cuda", ids[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """All RNG states as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save that never leaves a half-written file behind."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_options(options: dict, path: str | os.PathLike) -> None:
    write_text_atomic(yaml.safe_dump(options, sort_keys=True), path)


def load_options(path: str | os.PathLike) -> dict:
    return yaml.safe_load(Path(path).read_text()) or {}


def count_macs(model: torch.nn.Module, input_size: tuple[int, int] = (256, 128)) -> int:
    """Multiply-accumulates of one forward at batch 1 (`model.extract` for a re-ID network), by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    # a ViT with a fused attention path is counted with explicit attention (SDPA is not counted on the CPU)
    explicit = getattr(model, "explicit_attention", contextlib.nullcontext)
    with explicit(), counter, torch.no_grad():
        getattr(model, "extract", model)(torch.zeros(1, 3, *input_size, device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2
