"""Learnable synthetic image-classification sets in the real CIFAR-10 and ImageNet layouts.

Each class has its own colours and stripe direction; images vary in position, brightness and noise, so a
small network trained for two epochs clearly beats chance. Same arguments -> byte-identical files.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def class_looks(rng: np.random.Generator, n_classes: int) -> np.ndarray:
    """Two colours per class, shared by its training and test images."""
    return rng.integers(30, 226, size=(n_classes, 2, 3))


def class_images(rng: np.random.Generator, colors: np.ndarray, per_class: int, size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N x size x size x 3 images, labels), classes interleaved."""
    n_classes = len(colors)
    angles = np.linspace(0, np.pi, n_classes, endpoint=False)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images, labels = [], []
    for i in range(per_class):
        for c in range(n_classes):
            phase = rng.uniform(0, 2 * np.pi)
            stripes = np.sin(2 * np.pi * 3 * (np.cos(angles[c]) * xx + np.sin(angles[c]) * yy) + phase) > 0
            img = np.where(stripes[..., None], colors[c, 0], colors[c, 1]).astype(float)
            img = img * rng.uniform(0.75, 1.25) + rng.normal(0, 12, img.shape)
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(c)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def write_cifar10(out: Path, per_class: int, seed: int) -> dict:
    """out/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} as the python CIFAR-10 pickles."""
    rng = np.random.default_rng(seed)
    folder = out / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    looks = class_looks(rng, 10)
    train_x, train_y = class_images(rng, looks, per_class, 32)
    test_x, test_y = class_images(rng, looks, max(2, per_class // 5), 32)
    parts = np.array_split(np.arange(len(train_y)), 5)
    batches = {f"data_batch_{i + 1}": idx for i, idx in enumerate(parts)}
    for name, (x, y) in {**{k: (train_x[v], train_y[v]) for k, v in batches.items()},
                         "test_batch": (test_x, test_y)}.items():
        batch = {b"batch_label": name.encode(), b"labels": y.tolist(),
                 b"data": x.transpose(0, 3, 1, 2).reshape(len(x), 3072),  # R plane, G plane, B plane
                 b"filenames": [f"synthetic_{name}_{i:05d}.png".encode() for i in range(len(y))]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"class{c}".encode() for c in range(10)], b"num_cases_per_batch": len(parts[0]),
            b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {"train": len(train_y), "test": len(test_y)}


def write_imagenet(out: Path, n_classes: int, per_class: int, seed: int, size: int = 64) -> dict:
    """out/{train,val}/n<8 digits>/*.JPEG class folders."""
    rng = np.random.default_rng(seed)
    counts, looks = {}, class_looks(rng, n_classes)
    for split, n in (("train", per_class), ("val", max(2, per_class // 4))):
        images, labels = class_images(rng, looks, n, size)
        for i, (img, c) in enumerate(zip(images, labels)):
            path = out / split / f"n{c:08d}" / f"n{c:08d}_{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            path.write_bytes(buf.getvalue())
        counts[split] = len(labels)
    return counts
