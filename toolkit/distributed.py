"""torch.distributed helpers. In a single process every function is a no-op, so the scripts run unchanged
alone or under `torchrun --nproc_per_node N` (NCCL with CUDA, Gloo on the CPU)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def is_main_process() -> bool:
    """Rank 0 also before the process group exists (torchrun sets RANK for every process)."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(gpu_ids: str) -> torch.device:
    """The device of this process; under torchrun also the process group (one GPU per process: the
    LOCAL_RANK-th of --gpu_ids, or of all GPUs)."""
    from toolkit import utils
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return utils.select_device(gpu_ids)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        ids = utils.parse_gpu_ids(gpu_ids)
        ids = ids if len(ids) > 1 else list(range(torch.cuda.device_count()))
        device = torch.device("cuda", ids[local % len(ids)])
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return device


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def sum_tensor_over_ranks(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The elementwise sum of every rank's `t`, reduced on `device` (NCCL needs CUDA), returned on t's."""
    if world_size() == 1:
        return t
    summed = t.to(device)
    dist.all_reduce(summed)
    return summed.to(t.device)


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    if world_size() == 1:
        return values
    return sum_tensor_over_ranks(torch.tensor(values, dtype=torch.float64), device).tolist()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x` concatenated in rank order; gradients flow back to the rank each piece came from."""
    if world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn
    return torch.cat(dist_fn.all_gather(x))


def gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x` concatenated in rank order (no gradient)."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x)
    return torch.cat(out)
