"""Raw re-ID dataset layouts: file-name parsing and the `pytorch/` folder builder.

No torch import here: the prepare scripts stay fast and usable without it.
Every re-ID file name carries its identity and camera; this module is the one place
that knows how each dataset spells them.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from toolkit.errors import UserError

# the suffixes real re-ID releases use (Market/Duke/MSMT .jpg, CUHK01/CUHK03/PRID .png, VIPeR .bmp)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_IMAGE = r"\.(?:jpg|jpeg|png|bmp|JPG|JPEG|PNG|BMP)$"
# id, camera. Market: 0002_c1s1_000451_03.jpg (-1 = junk, 0000 = distractor)
MARKET_RE = re.compile(r"^(-1|\d+)_c(\d)s\d+_\d+_\d+" + _IMAGE)
# Duke: 0005_c2_f0046985.jpg
DUKE_RE = re.compile(r"^(-1|\d+)_c(\d+)_f\d+" + _IMAGE)
# MSMT17_V1: 0000_000_01_0303morning_0015_0.jpg; camera = the full third field (01..15)
MSMT_RE = re.compile(r"^(\d+)_\d+_(\d{2})_[^_]+_\d+_\d+" + _IMAGE)
# CUHK01: 0001001.png = identity 0001, image 001; images 001-002 are camera 1, 003-004 camera 2
CUHK01_RE = re.compile(r"^(\d{4})(00[1-4])" + _IMAGE)

NAME_PATTERNS = {"market": MARKET_RE, "duke": DUKE_RE, "msmt": MSMT_RE, "cuhk01": CUHK01_RE}
SPLITS = ("train", "val", "train_all", "query", "gallery")


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


class DatasetError(UserError):
    """A user-facing problem with a dataset (missing folder, malformed name); printed as one line."""


def parse_name(filename: str, fmt: str | None = None) -> tuple[int, int]:
    """(person id, camera) of a re-ID image file name; id -1 marks junk images.

    `fmt` restricts parsing to one dataset format; by default the first matching one is used
    (the three patterns are mutually exclusive, so detection from the name is unambiguous).
    """
    name = os.path.basename(filename)
    patterns = [NAME_PATTERNS[fmt]] if fmt else NAME_PATTERNS.values()
    for pattern in patterns:
        m = pattern.match(name)
        if m and pattern is CUHK01_RE:
            return int(m.group(1)), 1 if int(m.group(2)) <= 2 else 2
        if m:
            return int(m.group(1)), int(m.group(2))
    raise DatasetError(f"malformed re-ID image name {name!r} (expected e.g. 0002_c1s1_000451_03.jpg, "
                       "0005_c2_f0046985.jpg, 0000_000_01_0303morning_0015_0.jpg or 0001001.png)")


def id_folder(filename: str) -> str:
    """The identity folder name used under pytorch/: the id field as written ('0002', '-1', '0000')."""
    name = os.path.basename(filename)
    return name[:4] if CUHK01_RE.match(name) else name.split("_", 1)[0]


@dataclass
class PrepareReport:
    created: int = 0
    unchanged: int = 0
    removed: int = 0
    counts: dict = field(default_factory=dict)  # split -> (ids, images)

    def summary(self, out_dir: Path) -> str:
        lines = [f"{split:>11}: {ids:6d} ids {imgs:8d} images" for split, (ids, imgs) in self.counts.items()]
        if self.created == 0 and self.removed == 0:
            lines.append(f"nothing to do: all {self.unchanged} files already in place under {out_dir}")
        else:
            lines.append(f"wrote {self.created} files ({self.unchanged} already in place) under {out_dir}")
        if self.removed:
            lines.append(f"removed {self.removed} files no longer in the raw dataset")
        return "\n".join(lines)


def _same_file(src: Path, dst: Path) -> bool:
    try:
        return os.path.samefile(src, dst) or (dst.stat().st_size == src.stat().st_size
                                              and dst.read_bytes() == src.read_bytes())
    except OSError:
        return False


def place(src: Path, dst: Path, copy: bool, report: PrepareReport) -> None:
    """Hard-link (or copy) src to dst; an identical file already there is left alone."""
    if dst.exists():
        if _same_file(src, dst):
            report.unchanged += 1
            return
        dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copy2(src, dst)
    else:
        try:
            os.link(src, dst)
        except OSError:  # cross-device or a filesystem without hard links
            shutil.copy2(src, dst)
    report.created += 1


def jpgs(folder: Path) -> list[Path]:
    """The image files of a folder in sorted name order (Market ships Thumbs.db files: ignored)."""
    if not folder.is_dir():
        raise DatasetError(f"missing folder {folder}")
    return sorted(p for p in folder.iterdir() if is_image(p))


def build_split(files: Iterable[tuple[Path, str]], split: str, out_dir: Path, copy: bool,
                report: PrepareReport) -> None:
    """Place (source file, identity folder) pairs under out_dir/split/<id>/, remove what is no longer
    there, and count them."""
    ids, placed = set(), set()
    for src, pid in files:
        dst = out_dir / split / pid / src.name
        place(src, dst, copy, report)
        ids.add(pid)
        placed.add(dst)
    remove_stale(out_dir / split, placed, report)
    report.counts[split] = (len(ids), len(placed))


def build_splits(plan: dict[str, list[tuple[Path, str]]], out_dir: Path, copy: bool, report: PrepareReport) -> None:
    """Every split, after checking that none is empty (so an incomplete raw dataset writes nothing)."""
    empty = [split for split, files in plan.items() if not files]
    if empty:
        raise DatasetError(f"no images for the {' and '.join(empty)} split(s) of {out_dir.parent} "
                           "(is the raw dataset complete?)")
    for split, files in plan.items():
        build_split(files, split, out_dir, copy, report)


def remove_stale(folder: Path, keep: set[Path], report: PrepareReport) -> None:
    """Delete images under folder that the raw dataset no longer has (training would use them)."""
    for f in sorted(p for p in folder.rglob("*") if is_image(p)):
        if f not in keep:
            f.unlink()
            report.removed += 1
    for d in sorted((d for d in folder.iterdir() if d.is_dir()), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()


def first_image_val_split(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, val): the first image of every id in sorted file-name order goes to val."""
    train, val, seen = [], [], set()
    for f in sorted(files, key=lambda p: p.name):
        pid = id_folder(f.name)
        (train if pid in seen else val).append(f)
        seen.add(pid)
    return train, val


def checked(files: list[Path], fmt: str) -> list[Path]:
    """Validate every name (a malformed one is an error, not a silent skip)."""
    for f in files:
        parse_name(f.name, fmt)
    return files


def prepare_market_like(root: Path, fmt: str, copy: bool = False) -> tuple[PrepareReport, Path]:
    """Market-1501 / DukeMTMC-reID raw layout -> root/pytorch/{train,val,train_all,query,gallery}."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    out = root / "pytorch"
    report = PrepareReport()
    train_files = [f for f in checked(jpgs(root / "bounding_box_train"), fmt)
                   if parse_name(f.name, fmt)[0] > 0]  # junk/distractor are not training classes
    train, val = first_image_val_split(train_files)
    with_ids = lambda fs: [(f, id_folder(f.name)) for f in fs]  # noqa: E731
    plan = {"train": with_ids(train), "val": with_ids(val), "train_all": with_ids(train_files),
            "query": with_ids(checked(jpgs(root / "query"), fmt)),
            "gallery": with_ids(checked(jpgs(root / "bounding_box_test"), fmt))}
    if (root / "gt_bbox").is_dir():
        plan["multi-query"] = with_ids(checked(jpgs(root / "gt_bbox"), fmt))
    build_splits(plan, out, copy, report)
    if "multi-query" not in plan and (out / "multi-query").is_dir():  # gt_bbox was removed: a stale copy
        remove_stale(out / "multi-query", set(), report)
        shutil.rmtree(out / "multi-query")
    return report, out


def read_msmt_list(path: Path) -> list[str]:
    """Relative image paths of an MSMT17 list file; each line is '<id>/<name>.jpg <label>'."""
    if not path.is_file():
        raise DatasetError(f"missing list file {path}")
    rel = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or "/" not in parts[0]:
            raise DatasetError(f"{path}:{lineno}: malformed list line {line!r} "
                               "(expected '0000/0000_000_01_0303morning_0015_0.jpg 0')")
        if parts[0].startswith(("/", "\\")) or ".." in Path(parts[0]).parts or ":" in parts[0]:
            raise DatasetError(f"{path}:{lineno}: {parts[0]!r} leads outside the dataset folder")
        parse_name(parts[0], "msmt")
        rel.append(parts[0])
    return rel


def prepare_msmt(root: Path, copy: bool = False) -> tuple[PrepareReport, Path]:
    """MSMT17_V1 raw layout -> root/pytorch/{train,val,train_all,query,gallery}."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    out = root / "pytorch"
    report = PrepareReport()

    def files(list_name: str, image_dir: str) -> list[tuple[Path, str]]:
        pairs = []
        for rel in read_msmt_list(root / list_name):
            src = root / image_dir / rel
            if not src.is_file():
                raise DatasetError(f"{list_name} names {rel} but {src} does not exist")
            pairs.append((src, rel.split("/")[0]))
        return pairs

    train, val = files("list_train.txt", "train"), files("list_val.txt", "train")
    build_splits({"train": train, "val": val, "train_all": train + val, "query": files("list_query.txt", "test"),
                  "gallery": files("list_gallery.txt", "test")}, out, copy, report)
    return report, out


def prepare_cuhk01(root: Path, copy: bool = False) -> tuple[PrepareReport, Path]:
    """CUHK01 raw layout (campus/PPPPNNN.png) -> root/pytorch/.

    train_all: every identity (all 971 on the real set; what merged training uses). Evaluation split,
    fixed by the sorted identity order: the first half (485 of 971) are training ids -> train (all but
    each id's first image) and val (that first image); the others are test ids, camera 1 -> query,
    camera 2 -> gallery."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    files = checked(jpgs(root / "campus"), "cuhk01")
    ids = sorted({id_folder(f.name) for f in files})
    train_ids = set(ids[:len(ids) // 2])  # 485 of 971
    train, val = first_image_val_split([f for f in files if id_folder(f.name) in train_ids])
    test = [f for f in files if id_folder(f.name) not in train_ids]
    with_ids = lambda fs: [(f, id_folder(f.name)) for f in fs]  # noqa: E731
    plan = {"train": with_ids(train), "val": with_ids(val), "train_all": with_ids(files),
            "query": with_ids([f for f in test if parse_name(f.name, "cuhk01")[1] == 1]),
            "gallery": with_ids([f for f in test if parse_name(f.name, "cuhk01")[1] == 2])}
    out = root / "pytorch"
    report = PrepareReport()
    build_splits(plan, out, copy, report)
    return report, out


def prepare_main(fmt: str, default_dir: str, description: str) -> None:
    """Shared command line of prepare_market.py / prepare_duke.py / prepare_msmt.py / prepare_cuhk01.py."""
    from toolkit.cli import ArgumentParser, run_main

    parser = ArgumentParser(description=description)
    parser.add_argument("--data_dir", default=default_dir,
                        help=f"raw dataset folder (default: {default_dir}); output goes to DATA_DIR/pytorch")
    parser.add_argument("--copy", action="store_true",
                        help="copy images instead of hard-linking them (hard links fall back to copies "
                             "automatically where the filesystem does not support them)")
    args = parser.parse_args()

    def main(args) -> None:
        if fmt == "msmt":
            report, out = prepare_msmt(Path(args.data_dir), args.copy)
        elif fmt == "cuhk01":
            report, out = prepare_cuhk01(Path(args.data_dir), args.copy)
        else:
            report, out = prepare_market_like(Path(args.data_dir), fmt, args.copy)
        print(report.summary(out))

    run_main(main, args, (DatasetError,))
