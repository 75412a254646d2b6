"""Generate a small synthetic re-ID dataset in a REAL raw layout (Market-1501, DukeMTMC-reID, MSMT17_V1,
Occluded-Duke, CUHK01).

Every identity has a stable appearance (shirt and trouser colours, stripe pattern, bag side);
every camera changes lighting, background and position. A network trained for a few epochs
therefore clearly beats an untrained one, and the prepare/test/evaluate scripts see the same
file names and folders as on the real data. Same arguments and seed -> byte-identical files.

    python make_synthetic_data.py --format market --out datasets/synthetic/Market
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from toolkit import cli

HEIGHT, WIDTH = 64, 32
DEFAULT_OUT = {"market": "datasets/synthetic/Market", "duke": "datasets/synthetic/DukeMTMC-reID",
               "msmt": "datasets/synthetic/MSMT17_V1", "cifar10": "datasets/synthetic/cifar.python",
               "imagenet": "datasets/synthetic/ImageNet", "occluded_duke": "datasets/synthetic/transreid/Occluded_Duke",
               "cuhk01": "datasets/synthetic/CUHK01"}
DEFAULT_CAMERAS = {"market": 6, "duke": 8, "msmt": 15, "cifar10": 0, "imagenet": 0,  # no cameras there
                   "occluded_duke": 8, "cuhk01": 2}
MARKER = ".synthetic.json"


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--format", choices=["market", "duke", "msmt", "occluded_duke", "cuhk01", "cifar10", "imagenet"],
                   default="market",
                   help="raw layout and file-name pattern to write (occluded_duke: Duke names, every query image "
                        "partly covered, the layout transreid/ reads; cuhk01: campus/PPPPNNN.png, 4 images per id, "
                        "two per camera; cifar10/imagenet: classification sets for classification/; --ids is then "
                        "the class count, --images_per_id the training images per class)")
    p.add_argument("--out", default=None, help="output folder (default: datasets/synthetic/<dataset name>)")
    p.add_argument("--ids", type=cli.positive_int, default=24,
                   help="number of identities; the first half (rounded up) are training ids, the rest test ids")
    p.add_argument("--images_per_id", type=cli.positive_int, default=None,
                   help="images per identity (at least 4; default 12, and CUHK01's 4)")
    p.add_argument("--cameras", type=cli.positive_int, default=None,
                   help="number of cameras (default: 6 market, 8 duke and occluded_duke, 15 msmt; market allows "
                        "at most 6, msmt 99)")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0,
                   help="random seed; the same seed gives byte-identical files")
    p.add_argument("--overwrite", action="store_true",
                   help="delete OUT first when it holds something other than this exact synthetic dataset")
    return p


class Renderer:
    """Draws person-like 64x32 images from an identity code and a camera code."""

    def __init__(self, rng: np.random.Generator, n_ids: int, n_cams: int):
        self.id_colors = rng.integers(20, 236, size=(n_ids, 4, 3))  # head, shirt, trousers, stripes
        self.id_stripes = rng.integers(0, 4, size=n_ids)  # 0 = plain, else stripe period index
        self.id_bag = rng.integers(-1, 2, size=n_ids)  # bag on the left / none / right
        self.cam_light = rng.uniform(0.65, 1.3, size=n_cams)
        self.cam_bg = rng.integers(0, 256, size=(n_cams, 3))
        self.cam_shift = rng.integers(-4, 5, size=n_cams)
        self.rows = np.arange(HEIGHT)[:, None]
        self.cols = np.arange(WIDTH)[None, :]

    def person(self, rng: np.random.Generator, ident: int, cam: int) -> np.ndarray:
        img = np.empty((HEIGHT, WIDTH, 3))
        img[:] = self.cam_bg[cam]
        img *= (0.7 + 0.6 * (self.rows / HEIGHT))[..., None]  # a floor-to-ceiling light gradient
        cx = WIDTH / 2 + self.cam_shift[cam] + rng.integers(-2, 3)
        dy = rng.integers(-2, 3)
        r, c = self.rows - dy, self.cols
        head = ((r - 8) / 5.5) ** 2 + ((c - cx) / 4.0) ** 2 <= 1
        torso = (r >= 14) & (r < 36) & (np.abs(c - cx) <= 8)
        legs = (r >= 36) & (r < 62) & (np.abs(c - cx) <= 6) & (np.abs(c - cx) >= 1)
        colors = self.id_colors[ident]
        img[head] = colors[0]
        img[torso] = colors[1]
        if self.id_stripes[ident]:
            period = 2 + 2 * self.id_stripes[ident]
            img[torso & ((r // (period // 2)) % 2 == 0)] = colors[3]
        img[legs] = colors[2]
        if self.id_bag[ident]:
            bx = cx + 10 * self.id_bag[ident]
            img[(r >= 20) & (r < 32) & (np.abs(c - bx) <= 2)] = colors[3] // 2
        img = img * self.cam_light[cam] + rng.normal(0, 6, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8)

    def clutter(self, rng: np.random.Generator, cam: int) -> np.ndarray:
        """A junk / distractor box: background and blobs, no consistent person."""
        img = np.empty((HEIGHT, WIDTH, 3))
        img[:] = self.cam_bg[cam]
        for _ in range(3):
            y, x = rng.integers(0, HEIGHT), rng.integers(0, WIDTH)
            img[(np.abs(self.rows - y) < 8) & (np.abs(self.cols - x) < 6)] = rng.integers(0, 256, 3)
        img = img * self.cam_light[cam] + rng.normal(0, 6, img.shape)
        return np.clip(img, 0, 255).astype(np.uint8)

    def occlude(self, rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
        """Occluded-Duke's queries: an obstacle (a flat-coloured block) covers the lower or a side part."""
        img = img.copy()
        if rng.integers(0, 2):
            img[int(rng.integers(HEIGHT // 2, 3 * HEIGHT // 4)):] = rng.integers(0, 256, 3)
        else:
            w = int(rng.integers(WIDTH // 4, WIDTH // 2))
            img[:, :w] = rng.integers(0, 256, 3)
        return img


def image_bytes(img: np.ndarray, name: str) -> bytes:
    buf = io.BytesIO()
    if name.endswith(".png"):
        Image.fromarray(img).save(buf, format="PNG")
    else:
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def name_for(fmt: str, pid: int, cam: int, serial: int) -> str:
    """A file name in the dataset's real pattern; `serial` makes it unique."""
    if fmt == "market":
        pid_s = "-1" if pid < 0 else f"{pid:04d}"
        return f"{pid_s}_c{cam}s{1 + serial % 6}_{serial * 25:06d}_{serial % 7:02d}.jpg"
    if fmt in ("duke", "occluded_duke"):
        return f"{pid:04d}_c{cam}_f{serial * 37:07d}.jpg"
    tod = ("morning", "noon", "afternoon")[serial % 3]
    return f"{pid:04d}_{serial % 1000:03d}_{cam:02d}_0303{tod}_{serial % 10000:04d}_{serial % 3}.jpg"


def identity_images(rng: np.random.Generator, n_images: int, n_cams: int) -> list[int]:
    """Camera (0-based) of each image of one identity: at least two cameras, two images in each
    (so a test identity has a query and a gallery image per camera)."""
    k = max(2, min(n_cams, int(rng.integers(2, 5)), n_images // 2))
    cams = rng.choice(n_cams, size=k, replace=False)
    return [int(cams[j % k]) for j in range(n_images)]


def generate_cuhk01(out: Path, n_ids: int, seed: int) -> dict:
    """campus/PPPPNNN.png: ids 0001.., images 001-002 from camera 1, 003-004 from camera 2."""
    rng = np.random.default_rng(seed)
    render = Renderer(rng, n_ids, 2)
    (out / "campus").mkdir(parents=True, exist_ok=True)
    for ident in range(n_ids):
        for image in range(4):
            name = f"{ident + 1:04d}{image + 1:03d}.png"
            (out / "campus" / name).write_bytes(image_bytes(render.person(rng, ident, image // 2), name))
    return {"campus": 4 * n_ids}


def generate(fmt: str, out: Path, n_ids: int, per_id: int, n_cams: int, seed: int) -> dict:
    """Write the dataset; returns counts per raw folder."""
    if fmt == "cuhk01":
        return generate_cuhk01(out, n_ids, seed)
    rng = np.random.default_rng(seed)
    render = Renderer(rng, n_ids, n_cams)
    n_train = (n_ids + 1) // 2
    files: dict[str, list[tuple[str, np.ndarray]]] = {}
    serial = 0

    def add(folder: str, pid: int, cam: int, img: np.ndarray) -> str:
        nonlocal serial
        serial += 1
        # msmt ids restart at 0 in train and test, market/duke ids start at 1 (0000 = distractor)
        name = name_for(fmt, pid, cam + 1, serial)
        files.setdefault(folder, []).append((name, img))
        return name

    for ident in range(n_ids):
        is_train = ident < n_train
        pid = (ident if is_train else ident - n_train) if fmt == "msmt" else ident + 1
        seen_cams: set[int] = set()
        for cam in identity_images(rng, per_id, n_cams):
            img = render.person(rng, ident, cam)
            if is_train:
                add("train" if fmt == "msmt" else "bounding_box_train", pid, cam, img)
            elif cam not in seen_cams:  # first image of an id in a camera is its query
                seen_cams.add(cam)
                add("query", pid, cam, render.occlude(rng, img) if fmt == "occluded_duke" else img)
                if fmt == "market":
                    for _ in range(2):  # hand-drawn boxes of the same query person
                        add("gt_bbox", pid, cam, render.person(rng, ident, cam))
            else:
                add("test" if fmt == "msmt" else "bounding_box_test", pid, cam, img)
    if fmt == "market":
        for pid in (-1, 0):  # junk and distractor boxes
            for _ in range(max(2, n_ids // 2)):
                cam = int(rng.integers(0, n_cams))
                add("bounding_box_test", pid, cam, render.clutter(rng, cam))

    counts = {}
    for folder, items in files.items():
        for name, img in items:
            if fmt == "msmt":
                sub = "test" if folder == "query" else folder
                path = out / sub / name[:4] / name
            else:
                path = out / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image_bytes(img, name))
        counts[folder] = len(items)
    if fmt == "msmt":
        write_msmt_lists(out, files)
    return counts


def write_msmt_lists(out: Path, files: dict) -> None:
    """list_train/list_val from the train images (first image of each id -> val), query/gallery from test."""
    def line(name: str, labels: dict) -> str:
        return f"{name[:4]}/{name} {labels.setdefault(name[:4], len(labels))}\n"

    train = sorted(n for n, _ in files["train"])
    first = {}
    for n in train:
        first.setdefault(n[:4], n)
    labels: dict = {}
    val = [n for n in train if first[n[:4]] == n]
    (out / "list_train.txt").write_text("".join(line(n, labels) for n in train if first[n[:4]] != n))
    (out / "list_val.txt").write_text("".join(line(n, labels) for n in val))
    test_labels: dict = {}
    (out / "list_query.txt").write_text("".join(line(n, test_labels) for n in sorted(n for n, _ in files["query"])))
    (out / "list_gallery.txt").write_text("".join(line(n, test_labels) for n in sorted(n for n, _ in files["test"])))


def main(args: argparse.Namespace) -> int:
    fmt = args.format
    out = Path(args.out or DEFAULT_OUT[fmt])
    cams = args.cameras or DEFAULT_CAMERAS[fmt]
    per_id = args.images_per_id or (4 if fmt == "cuhk01" else 12)
    limit = {"market": 6, "duke": 9, "occluded_duke": 9, "msmt": 99, "cuhk01": 2, "cifar10": 0, "imagenet": 0}[fmt]
    if fmt == "cuhk01" and (cams != 2 or per_id != 4):
        print("error: CUHK01 has exactly 2 cameras and 4 images per identity (--cameras 2 --images_per_id 4)",
              file=sys.stderr)
        return 2
    if limit and not 2 <= cams <= limit:
        print(f"error: --cameras must be between 2 and {limit} for {fmt}", file=sys.stderr)
        return 2
    if args.ids < 2 or per_id < 4:
        print("error: --ids must be at least 2 and --images_per_id at least 4", file=sys.stderr)
        return 2
    if fmt == "cuhk01" and args.ids > 9999:
        print("error: CUHK01 names hold 4-digit identities: --ids at most 9999", file=sys.stderr)
        return 2
    params = {"format": fmt, "ids": args.ids, "images_per_id": per_id, "cameras": cams,
              "seed": args.seed, "version": 1}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == params:
        print(f"{out} already holds this synthetic dataset ({params}); nothing to do")
        return 0
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            print(f"error: {out} is not empty and was not generated with these arguments; "
                  "pass --overwrite to replace it", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    if fmt == "cifar10":
        from classification.synthetic import write_cifar10
        counts = write_cifar10(out, per_id, args.seed)
    elif fmt == "imagenet":
        from classification.synthetic import write_imagenet
        counts = write_imagenet(out, args.ids, per_id, args.seed)
    else:
        counts = generate(fmt, out, args.ids, per_id, cams, args.seed)
    marker.write_text(json.dumps(params))
    print(f"wrote synthetic {fmt} dataset to {out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    cli.run_main(lambda args: sys.exit(main(args)), get_args_parser().parse_args())
