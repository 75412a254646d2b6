"""Market-1501 and Occluded-Duke in their raw layouts, TransReID's transforms, identity-balanced batches.

    ROOT_DIR/market1501/{bounding_box_train,query,bounding_box_test}/0002_c1s1_000451_03.jpg
    ROOT_DIR/Occluded_Duke/{bounding_box_train,query,bounding_box_test}/0005_c2_f0046985.jpg

No prepare step: ids and cameras come from the file names (dataset_layout.parse_name). Images of id -1
are skipped everywhere, distractors (0000) stay in the gallery, cameras are 0-based, training ids are
relabelled 0..K-1 in sorted order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from toolkit.data import epoch_generator, load_rgb
from toolkit.layouts import DatasetError, is_image, parse_name
from transreid.config import DATASETS

SPLITS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def read_split(folder: Path) -> list[tuple[Path, int, int]]:
    """[(path, person id, 0-based camera)] of one raw folder, id -1 skipped, sorted by name."""
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist (DATASETS.ROOT_DIR must hold "
                           f"{folder.parent.name}/{{bounding_box_train,query,bounding_box_test}})")
    items = []
    for path in sorted(p for p in folder.iterdir() if is_image(p)):
        pid, cam = parse_name(path.name)
        if pid != -1:
            items.append((path, pid, cam - 1))
    if not items:
        raise DatasetError(f"dataset folder {folder} holds no usable images")
    return items


@dataclass
class ReidSplits:
    train: list[tuple[Path, int, int]]  # labels already relabelled 0..K-1
    query: list[tuple[Path, int, int]]
    gallery: list[tuple[Path, int, int]]
    num_classes: int
    camera_num: int


def read_dataset(cfg) -> ReidSplits:
    root = Path(cfg.DATASETS.ROOT_DIR) / DATASETS[cfg.DATASETS.NAMES]
    train, query, gallery = (read_split(root / SPLITS[s]) for s in ("train", "query", "gallery"))
    relabel = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in train}))}
    if len(relabel) < 2:
        raise DatasetError(f"{root / SPLITS['train']} holds {len(relabel)} identity: training needs at least 2")
    cams = {c for items in (train, query, gallery) for _, _, c in items}
    return ReidSplits([(p, relabel[pid], c) for p, pid, c in train], query, gallery, len(relabel), max(cams) + 1)


def train_transform(cfg) -> transforms.Compose:
    i = cfg.INPUT
    return transforms.Compose([
        transforms.Resize(list(i.SIZE_TRAIN)), transforms.RandomHorizontalFlip(p=i.PROB),
        transforms.Pad(i.PADDING), transforms.RandomCrop(list(i.SIZE_TRAIN)), transforms.ToTensor(),
        transforms.Normalize(i.PIXEL_MEAN, i.PIXEL_STD),
        transforms.RandomErasing(p=i.RE_PROB, value="random")])  # random pixels, as TransReID's 'pixel' mode


def test_transform(cfg) -> transforms.Compose:
    i = cfg.INPUT
    return transforms.Compose([transforms.Resize(list(i.SIZE_TEST)), transforms.ToTensor(),
                               transforms.Normalize(i.PIXEL_MEAN, i.PIXEL_STD)])


class ImageList(Dataset):
    """(image, person id, camera) of a list of (path, id, camera)."""

    def __init__(self, items: list[tuple[Path, int, int]], transform: transforms.Compose):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        path, pid, cam = self.items[index]
        return self.transform(load_rgb(path)), pid, cam


class IdentitySampler(Sampler[int]):
    """TransReID's identity-balanced order: each id's images are shuffled and cut into chunks of
    `num_instance` (an id with fewer images is filled up by drawing with replacement); batches take
    P = batch / num_instance ids at random, one chunk each, until fewer than P ids have chunks left.

    The order depends only on (seed, epoch): every rank draws the same global batches of `batch` images
    and rank r of `world` takes its slice, so N ranks together see exactly one process's batches."""

    def __init__(self, labels: list[int], batch: int, num_instance: int, seed: int, rank: int = 0, world: int = 1):
        self.by_id: dict[int, list[int]] = {}
        for i, pid in enumerate(labels):
            self.by_id.setdefault(pid, []).append(i)
        self.batch, self.k, self.seed, self.rank, self.world = batch, num_instance, seed, rank, world
        self.epoch = 0
        self._cache: tuple[int, list[int]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_order(self) -> list[int]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._draw())
        return self._cache[1]

    def _draw(self) -> list[int]:
        gen = epoch_generator(self.seed, self.epoch)
        chunks: dict[int, list[list[int]]] = {}
        for pid, idx in self.by_id.items():
            if len(idx) < self.k:
                idx = [idx[j] for j in torch.randint(len(idx), (self.k,), generator=gen).tolist()]
            idx = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
            chunks[pid] = [idx[j:j + self.k] for j in range(0, len(idx) - self.k + 1, self.k)]
        per_batch = self.batch // self.k
        order: list[int] = []
        available = sorted(chunks)
        while len(available) >= per_batch:
            picked = [available[j] for j in torch.randperm(len(available), generator=gen)[:per_batch].tolist()]
            for pid in picked:
                order += chunks[pid].pop()
            available = [pid for pid in available if chunks[pid]]
        return order

    def __iter__(self):
        order = self.global_order()
        share = self.batch // self.world
        for start in range(0, len(order), self.batch):
            yield from order[start + self.rank * share:start + (self.rank + 1) * share]

    def __len__(self) -> int:
        return len(self.global_order()) // self.world


def make_train_loader(cfg, splits: ReidSplits, rank: int = 0, world: int = 1) -> DataLoader:
    batch = cfg.SOLVER.IMS_PER_BATCH
    if batch % world:
        raise DatasetError(f"SOLVER.IMS_PER_BATCH {batch} (the global batch) must be a multiple of the "
                           f"{world} processes")
    sampler = IdentitySampler([pid for _, pid, _ in splits.train], batch, cfg.DATALOADER.NUM_INSTANCE,
                              cfg.SOLVER.SEED, rank, world)
    if len(sampler) == 0:
        raise DatasetError(f"the training set ({splits.num_classes} ids) cannot fill one batch of "
                           f"{batch // cfg.DATALOADER.NUM_INSTANCE} ids x {cfg.DATALOADER.NUM_INSTANCE} images")
    return DataLoader(ImageList(splits.train, train_transform(cfg)), batch_size=batch // world, sampler=sampler,
                      num_workers=cfg.DATALOADER.NUM_WORKERS, drop_last=True)


def make_test_loader(cfg, splits: ReidSplits, rank: int = 0, world: int = 1) -> DataLoader:
    """Query then gallery images; under torchrun rank r takes every world-th image (see gather_features)."""
    items = (splits.query + splits.gallery)[rank::world]
    return DataLoader(ImageList(items, test_transform(cfg)), batch_size=cfg.TEST.IMS_PER_BATCH, shuffle=False,
                      num_workers=cfg.DATALOADER.NUM_WORKERS)
