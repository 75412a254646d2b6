"""CIFAR-10 (the python pickle batches) and ImageNet (class folders), with the SFP paper's transforms.

The CIFAR reader is the project's own: torchvision's CIFAR10 md5-checks the files (a synthetic set in
the real format would fail), and a pickle is read with an unpickler that builds only the lists, dicts,
bytes and NumPy arrays these files hold, never an arbitrary object.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms

from toolkit.data import IMAGENET_MEAN, IMAGENET_STD, epoch_generator
from toolkit.layouts import DatasetError

CIFAR_MEAN = [x / 255 for x in (125.3, 123.0, 113.9)]
CIFAR_STD = [x / 255 for x in (63.0, 62.1, 66.7)]
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


class _CifarUnpickler(pickle.Unpickler):
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}  # protocol-2 bytes

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 32 x 32 x 3, labels int64 N) of one CIFAR-10 python batch file."""
    if not path.is_file():
        raise DatasetError(f"missing CIFAR-10 file {path} (expected ROOT/cifar-10-batches-py/data_batch_1..5, "
                           "test_batch)")
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as e:  # truncated, foreign, or malicious file
        raise DatasetError(f"cannot read CIFAR-10 file {path}: {type(e).__name__}: {e}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DatasetError(f"{path}: expected data N x 3072 and N labels, got {data.shape} and {len(labels)}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


class Cifar10(Dataset):
    """ROOT/cifar-10-batches-py/{data_batch_1..5 | test_batch} as (image tensor, label)."""

    def __init__(self, root: str | Path, train: bool, transform: transforms.Compose):
        folder = Path(root) / "cifar-10-batches-py"
        if not folder.is_dir():
            raise DatasetError(f"{folder} does not exist (the python version of CIFAR-10 unpacks there)")
        parts = [read_cifar_batch(folder / name) for name in (CIFAR_TRAIN if train else ["test_batch"])]
        self.images = np.concatenate([p[0] for p in parts])
        self.targets = np.concatenate([p[1] for p in parts])
        if self.targets.min() < 0 or self.targets.max() > 9:
            raise DatasetError(f"{folder}: CIFAR-10 labels must be 0..9")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.targets[i])


def cifar_transforms(train: bool) -> transforms.Compose:
    ops = [transforms.RandomHorizontalFlip(), transforms.RandomCrop(32, padding=4)] if train else []
    return transforms.Compose([*ops, transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])


def imagenet_transforms(train: bool, size: int = 224) -> transforms.Compose:
    ops = ([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()] if train else
           [transforms.Resize(size * 256 // 224), transforms.CenterCrop(size)])
    return transforms.Compose([*ops, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def imagenet_folder(root: str | Path, train: bool, size: int = 224) -> datasets.ImageFolder:
    folder = Path(root) / ("train" if train else "val")
    if not folder.is_dir():
        raise DatasetError(f"{folder} does not exist (expected ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG)")
    try:
        return datasets.ImageFolder(str(folder), imagenet_transforms(train, size))
    except (FileNotFoundError, RuntimeError) as e:
        raise DatasetError(f"{folder}: {e}") from None


class GlobalBatchSampler(Sampler[int]):
    """A seeded per-epoch order cut into global batches; rank r takes slot r of each, so N processes with
    batch B see exactly the batches one process with batch N*B would (train: full batches only)."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.shuffle, self.seed, self.rank, self.world = n, batch_size, shuffle, seed, \
            rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = (torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch))
                 if self.shuffle else torch.arange(self.n))
        if self.shuffle:  # training: whole global batches
            steps = self.n // (self.batch_size * self.world)
            return iter(order[:steps * self.batch_size * self.world].view(steps, self.world, self.batch_size)
                        [:, self.rank].flatten().tolist())
        bounds = [self.n * r // self.world for r in range(self.world + 1)]  # evaluation: contiguous shards
        return iter(order[bounds[self.rank]:bounds[self.rank + 1]].tolist())

    def __len__(self) -> int:
        if self.shuffle:
            return self.n // (self.batch_size * self.world) * self.batch_size
        return self.n * (self.rank + 1) // self.world - self.n * self.rank // self.world


def make_loader(dataset: Dataset, batch_size: int, train: bool, workers: int, seed: int = 0, rank: int = 0,
                world: int = 1, pin_memory: bool = False) -> DataLoader:
    if train and len(dataset) < batch_size * world:
        raise DatasetError(f"{len(dataset)} training images, fewer than one batch of {batch_size} x {world}")
    sampler = GlobalBatchSampler(len(dataset), batch_size, train, seed, rank, world)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=train,
                      pin_memory=pin_memory)
