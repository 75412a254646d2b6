"""Pictures of rank lists: each chosen query beside its top-ranked gallery images, framed by correctness.

One row per query: the query (blue frame), a gap, then its top-k gallery images in rank order, framed
green (a correct match: same id, other camera), red (a wrong id) or grey (junk: id -1, or the query's
id in the query's camera). The row's caption holds the query's index, id and AP. Pillow only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from toolkit.ranking import EvaluationError

CELL_H, CELL_W, FRAME, GAP, CAPTION = 128, 64, 4, 8, 16
COLOURS = {"query": (30, 90, 230), "match": (0, 190, 0), "wrong": (220, 0, 0), "junk": (150, 150, 150)}
BACKGROUND = (255, 255, 255)


@dataclass
class RankRow:
    query_path: str
    caption: str
    gallery: list[tuple[str, str]]  # (image path, "match" | "wrong" | "junk"), best first


def cell_kinds(query_label: int, query_cam: int, labels: np.ndarray, cams: np.ndarray) -> list[str]:
    """How each gallery item of a rank list is framed for a query (the evaluator's junk rule)."""
    junk = (labels == -1) | ((labels == query_label) & (cams == query_cam))
    return ["junk" if j else "match" if lab == query_label else "wrong" for lab, j in zip(labels, junk)]


def cell_origin(row: int, column: int) -> tuple[int, int]:
    """(x, y) of the top-left pixel of a cell's frame; column 0 is the query, 1.. the ranks."""
    x = column * (CELL_W + 2 * FRAME + GAP) + (GAP if column > 0 else 0)
    y = row * (CELL_H + 2 * FRAME + CAPTION + GAP) + CAPTION
    return x, y


def _image(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB").resize((CELL_W, CELL_H), Image.Resampling.BILINEAR)
    except FileNotFoundError:
        raise EvaluationError(f"image {path} named in the .mat does not exist (run evaluate_gpu.py from the "
                              "folder test.py ran in, or re-run test.py)") from None
    except OSError as e:
        raise EvaluationError(f"cannot read image {path}: {str(e).splitlines()[0]}") from None


def draw_rank_rows(rows: list[RankRow], top: int) -> Image.Image:
    last_x, last_y = cell_origin(len(rows) - 1, top)
    canvas = Image.new("RGB", (last_x + CELL_W + 2 * FRAME, last_y + CELL_H + 2 * FRAME), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        x0, y0 = cell_origin(r, 0)
        draw.text((x0 + 2, y0 - CAPTION + 2), row.caption, fill=(0, 0, 0))
        cells = [(row.query_path, "query")] + row.gallery
        for c, (path, kind) in enumerate(cells):
            x, y = cell_origin(r, c)
            draw.rectangle([x, y, x + CELL_W + 2 * FRAME - 1, y + CELL_H + 2 * FRAME - 1], fill=COLOURS[kind])
            canvas.paste(_image(path), (x + FRAME, y + FRAME))
    return canvas


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    from toolkit.atomic_io import atomic_path
    with atomic_path(Path(path)) as tmp:
        image.save(tmp, format="PNG")
