"""Training and test data: transforms, anchor+positives dataset, balanced sampler, test sets."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from toolkit.layouts import DatasetError, is_image, parse_name

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's sample order: every sampler of the project draws from it, so a run's
    order depends on (seed, epoch) only, whatever the number of processes."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)
NUM_POSITIVES = 4


def train_transform(size: tuple[int, int], erasing_p: float = 0.0, color_jitter: bool = False) -> transforms.Compose:
    ops = [transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
           transforms.RandomHorizontalFlip()]
    if color_jitter:
        ops.append(transforms.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0))
    ops += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if erasing_p > 0:
        ops.append(transforms.RandomErasing(p=erasing_p, value=0))
    return transforms.Compose(ops)


def test_transform(size: tuple[int, int]) -> transforms.Compose:
    return transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image path, class index)]) in ImageFolder order: sorted folders, sorted files."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist (run prepare_market.py / prepare_duke.py / "
                           "prepare_msmt.py / prepare_cuhk01.py first, and point --data_dir at the pytorch/ folder)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    samples = [(p, i) for i, c in enumerate(classes) for p in sorted((root / c).iterdir()) if is_image(p)]
    if not samples:
        raise DatasetError(f"dataset folder {root} holds no images")
    return classes, samples


def dataset_name(root: str | os.PathLike) -> str:
    """'Market' for .../Market/pytorch or .../Market/pytorch/train_all; the folder's own name otherwise.
    Several comma-separated folders (merged training) give 'Market+Duke'."""
    if "," in str(root):
        return "+".join(dataset_name(r) for r in str(root).split(",") if r)
    root = Path(root)
    if root.name in ("train", "train_all", "val", "query", "gallery", "multi-query"):
        root = root.parent
    return root.parent.name if root.name == "pytorch" else root.name


def training_dirs(data_dir: str, train_all: bool) -> list[Path]:
    """The train/ (or train_all/) folders of one or several comma-separated prepared datasets."""
    return [Path(d) / ("train_all" if train_all else "train") for d in str(data_dir).split(",") if d]


def scan_sources(roots: list[str | os.PathLike]) -> tuple[list[str], list[tuple[Path, int]], list[dict]]:
    """Several image folders merged into one label space: (class names, samples, per-source summary).

    Source i's identities get the labels after those of sources 0..i-1, so ids of different datasets
    never collide even when their folder names (e.g. '0002') do. With one source nothing is renamed."""
    classes, samples, summary = [], [], []
    for root in roots:
        names, found = scan_image_folder(root)
        prefix = f"{dataset_name(root)}/" if len(roots) > 1 else ""
        samples += [(path, label + len(classes)) for path, label in found]
        classes += [prefix + name for name in names]
        summary.append({"source": str(root), "ids": len(names), "images": len(found)})
    return classes, samples, summary


def describe_sources(sources: list[dict]) -> str:
    """'Market 751 + DukeMTMC-reID 702 + CUHK01 971 = 2424 classes' for a merged training set."""
    parts = " + ".join(f"{dataset_name(s['source'])} {s['ids']}" for s in sources)
    return f"{parts} = {sum(s['ids'] for s in sources)} classes"


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as e:  # PIL's UnidentifiedImageError, a truncated file, a vanished one
        raise DatasetError(f"cannot read image {path}: {str(e).splitlines()[0]}") from None


class AnchorPositives(Dataset):
    """Item i: (anchor image, label, 4 positives of the same id), from one image folder or several
    merged ones (see scan_sources).

    Positives are a random permutation of the id's other images taken cyclically, so an id with fewer
    than four other images repeats them, and an id with a single image uses the anchor itself.
    """

    def __init__(self, roots: str | os.PathLike | list[str | os.PathLike], transform: transforms.Compose):
        roots = roots if isinstance(roots, (list, tuple)) else [roots]
        self.classes, self.samples, self.sources = scan_sources(list(roots))
        self.transform = transform
        self.by_class: list[list[int]] = [[] for _ in self.classes]
        for i, (_, label) in enumerate(self.samples):
            self.by_class[label].append(i)
        self.targets = torch.tensor([label for _, label in self.samples])

    def __len__(self) -> int:
        return len(self.samples)

    def positive_indices(self, index: int) -> list[int]:
        others = [j for j in self.by_class[self.samples[index][1]] if j != index] or [index]
        order = torch.randperm(len(others)).tolist()
        return [others[order[k % len(others)]] for k in range(NUM_POSITIVES)]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        path, label = self.samples[index]
        positives = torch.stack([self.transform(load_rgb(self.samples[j][0])) for j in self.positive_indices(index)])
        return self.transform(load_rgb(path)), label, positives


class BalancedSampler(Sampler[int]):
    """Each epoch draws len(dataset) images with replacement, an image weighing N / (size of its class).

    The draw depends only on (seed, epoch), so it is the same on every rank, and rank r of `world` takes
    slot r of every global batch of world x batch_size images: the ranks' batches of one step together
    are the batch a single process would take with batch_size x world.
    """

    def __init__(self, targets: torch.Tensor, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        counts = torch.bincount(targets).double()
        self.weights = len(targets) / counts[targets]
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.steps = len(targets) // (batch_size * world)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = epoch_generator(self.seed, self.epoch)
        draw = torch.multinomial(self.weights, len(self.weights), replacement=True, generator=gen)
        per_step = draw[:self.steps * self.batch_size * self.world].view(self.steps, self.world, self.batch_size)
        return iter(per_step[:, self.rank].flatten().tolist())

    def __len__(self) -> int:
        return self.steps * self.batch_size


def train_loader(root: str | os.PathLike | list[str | os.PathLike], batch_size: int, size: tuple[int, int],
                 workers: int, erasing_p: float = 0.0, color_jitter: bool = False, pin_memory: bool = False,
                 seed: int = 0, rank: int = 0, world: int = 1) -> DataLoader:
    dataset = AnchorPositives(root, train_transform(size, erasing_p, color_jitter))
    if len(dataset.classes) < 2:
        names = " + ".join(d["source"] for d in dataset.sources)
        raise DatasetError(f"{names} holds {len(dataset.classes)} identity: training needs at least 2 "
                           "(the triplet loss takes its negatives from other identities)")
    if len(dataset) < batch_size * world:
        names = " + ".join(d["source"] for d in dataset.sources)
        raise DatasetError(f"{names} has {len(dataset)} images, fewer than one batch of {batch_size} x {world}")
    return DataLoader(dataset, batch_size=batch_size, sampler=BalancedSampler(dataset.targets, batch_size, seed,
                                                                              rank, world),
                      num_workers=workers, drop_last=True, pin_memory=pin_memory)


class ReidImages(Dataset):
    """A query/gallery folder; ids and cameras come from the file names (junk '-1' -> -1)."""

    def __init__(self, root: str | os.PathLike, transform: transforms.Compose):
        _, samples = scan_image_folder(root)
        self.paths = [p for p, _ in samples]
        parsed = [parse_name(p.name) for p in self.paths]
        self.labels = [pid for pid, _ in parsed]
        self.cams = [cam for _, cam in parsed]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_rgb(self.paths[index]))
