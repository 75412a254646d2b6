"""prepare_*.py on generated data of every format: counts, the val rule, cameras, idempotency, errors."""
import os
from pathlib import Path

import pytest
from conftest import run_script

from make_synthetic_data import generate
from toolkit.layouts import parse_name


def files_under(folder: Path) -> dict[str, list[str]]:
    return {d.name: sorted(f.name for f in d.iterdir()) for d in sorted(folder.iterdir())}


@pytest.mark.parametrize("fmt,script,raw", [("market", "prepare_market.py", "bounding_box_train"),
                                            ("duke", "prepare_duke.py", "bounding_box_train")])
def test_market_like_splits(tmp_path, fmt, script, raw):
    root = tmp_path / "data"
    generate(fmt, root, n_ids=10, per_id=6, n_cams=5, seed=1)
    res = run_script(script, "--data_dir", root)
    assert res.returncode == 0, res.stderr
    out = root / "pytorch"
    train_raw = sorted(f.name for f in (root / raw).iterdir())
    train_all = files_under(out / "train_all")
    train, val = files_under(out / "train"), files_under(out / "val")
    # the first image of each id in sorted name order is the val image, the rest are train
    for pid, names in train_all.items():
        assert val[pid] == [names[0]]
        assert train[pid] == names[1:]
    assert sum(map(len, train_all.values())) == len(train_raw) == 5 * 6
    # query/gallery keep every raw image, junk -1 and distractor 0000 included under their own folders
    gallery = files_under(out / "gallery")
    n_test = len(list((root / "bounding_box_test").iterdir()))
    assert sum(map(len, gallery.values())) == n_test
    if fmt == "market":
        assert "-1" in gallery and "0000" in gallery
        assert (out / "multi-query").is_dir()
    assert sum(map(len, files_under(out / "query").values())) == len(list((root / "query").iterdir()))
    # hard links by default
    some = out / "train_all" / next(iter(train_all)) / next(iter(train_all.values()))[0]
    assert os.stat(some).st_nlink >= 2
    assert "train_all" in res.stdout and "ids" in res.stdout


def test_idempotent_second_run_changes_nothing(tmp_path):
    root = tmp_path / "Market"
    generate("market", root, n_ids=6, per_id=4, n_cams=3, seed=2)
    assert run_script("prepare_market.py", "--data_dir", root, "--copy").returncode == 0
    before = {p: p.stat().st_mtime_ns for p in (root / "pytorch").rglob("*.jpg")}
    res = run_script("prepare_market.py", "--data_dir", root, "--copy")
    assert res.returncode == 0 and "nothing to do" in res.stdout
    assert {p: p.stat().st_mtime_ns for p in (root / "pytorch").rglob("*.jpg")} == before
    # copies, not links
    assert all(p.stat().st_nlink == 1 for p in before)


def test_msmt_lists_and_two_digit_cameras(tmp_path):
    root = tmp_path / "MSMT17_V1"
    generate("msmt", root, n_ids=8, per_id=6, n_cams=15, seed=4)
    res = run_script("prepare_msmt.py", "--data_dir", root)
    assert res.returncode == 0, res.stderr
    out = root / "pytorch"
    listed = lambda name: [line.split()[0] for line in (root / name).read_text().splitlines()]  # noqa: E731
    for split, lists in [("train", ["list_train.txt"]), ("val", ["list_val.txt"]),
                         ("train_all", ["list_train.txt", "list_val.txt"]),
                         ("query", ["list_query.txt"]), ("gallery", ["list_gallery.txt"])]:
        expect = sorted(p for name in lists for p in listed(name))
        got = sorted(f"{p.parent.name}/{p.name}" for p in (out / split).rglob("*.jpg"))
        assert got == expect, split
    # val images are in val, not train (the reference wrote them to the wrong folder)
    assert not set(listed("list_val.txt")) & {f"{p.parent.name}/{p.name}" for p in (out / "train").rglob("*.jpg")}
    cams = {parse_name(p.name)[1] for p in root.rglob("*.jpg")}
    assert max(cams) >= 10, "generator must produce two-digit MSMT cameras"
    assert parse_name("0000_000_12_0303morning_0015_0.jpg") == (0, 12)
    assert parse_name("0002_c1s1_000451_03.jpg") == (2, 1)
    assert parse_name("-1_c3s2_000101_00.jpg") == (-1, 3)
    assert parse_name("0005_c2_f0046985.jpg") == (5, 2)


@pytest.mark.parametrize("break_it,message", [
    (lambda root: __import__("shutil").rmtree(root / "query"), "missing folder"),
    (lambda root: (root / "query" / "not_a_reid_name.jpg").write_bytes(b""), "malformed re-ID image name"),
])
def test_market_errors_are_one_line(tmp_path, break_it, message):
    root = tmp_path / "Market"
    generate("market", root, n_ids=4, per_id=4, n_cams=3, seed=5)
    break_it(root)
    res = run_script("prepare_market.py", "--data_dir", root)
    assert res.returncode == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_missing_dataset_folder(tmp_path):
    res = run_script("prepare_duke.py", "--data_dir", tmp_path / "nope")
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("break_it,message", [
    (lambda root: (root / "list_val.txt").unlink(), "missing list file"),
    (lambda root: (root / "list_query.txt").write_text("0000/0000_000_01_0303morning_0015_0.jpg\n"),
     "malformed list line"),
    (lambda root: (root / "list_gallery.txt").write_text("0000/0000_c1_f01.jpg 0\n"), "malformed re-ID image name"),
    (lambda root: (root / "list_train.txt").write_text("0999/0999_000_01_0303morning_0015_0.jpg 0\n"),
     "does not exist"),
    (lambda root: (root / "list_train.txt").write_text("../../0000/0000_000_01_0303morning_0015_0.jpg 0\n"),
     "leads outside the dataset folder"),
    (lambda root: (root / "list_query.txt").write_text(f"{root}/test/0000_000_01_0303morning_0015_0.jpg 0\n"),
     "leads outside the dataset folder"),
])
def test_msmt_errors(tmp_path, break_it, message):
    root = tmp_path / "MSMT17_V1"
    generate("msmt", root, n_ids=4, per_id=4, n_cams=15, seed=6)
    break_it(root)
    res = run_script("prepare_msmt.py", "--data_dir", root)
    assert res.returncode == 2, res.stdout
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (root / "pytorch").exists()
