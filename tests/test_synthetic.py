"""The synthetic generator: determinism, real naming patterns, refusal to clobber."""
import hashlib

import pytest
from conftest import run_script

from toolkit.layouts import DUKE_RE, MARKET_RE, MSMT_RE


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_byte_identical_other_seed_differs(tmp_path):
    args = ["--format", "market", "--ids", "6", "--images_per_id", "4", "--cameras", "3"]
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        assert run_script("make_synthetic_data.py", *args, "--seed", seed, "--out", tmp_path / name).returncode == 0
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


@pytest.mark.parametrize("fmt,pattern,folders", [
    ("market", MARKET_RE, ["bounding_box_train", "bounding_box_test", "query", "gt_bbox"]),
    ("duke", DUKE_RE, ["bounding_box_train", "bounding_box_test", "query"]),
    ("msmt", MSMT_RE, ["train", "test"]),
    ("occluded_duke", DUKE_RE, ["bounding_box_train", "bounding_box_test", "query"]),
])
def test_real_layout_and_names(tmp_path, fmt, pattern, folders):
    out = tmp_path / fmt
    res = run_script("make_synthetic_data.py", "--format", fmt, "--ids", "8", "--images_per_id", "5", "--out", out)
    assert res.returncode == 0, res.stderr
    for folder in folders:
        names = [p.name for p in (out / folder).rglob("*.jpg")]
        assert names and all(pattern.match(n) for n in names), folder
    if fmt == "market":
        ids = {n.split("_")[0] for n in (p.name for p in (out / "bounding_box_test").iterdir())}
        assert {"-1", "0000"} <= ids
    if fmt == "msmt":
        for lst in ["list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt"]:
            assert (out / lst).read_text().strip()


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    res = run_script("make_synthetic_data.py", "--out", tmp_path / "x")
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert (tmp_path / "x" / "keep.txt").exists()
    again = run_script("make_synthetic_data.py", "--out", tmp_path / "y")
    assert again.returncode == 0
    assert "nothing to do" in run_script("make_synthetic_data.py", "--out", tmp_path / "y").stdout
