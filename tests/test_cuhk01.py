"""CUHK01: prepare_cuhk01.py on synthetic raw data (split rule, idempotence, stale files, errors), the
synthetic generator, and the 751 + 702 + 971 = 2,424-class merge of the edge pipeline."""
import os
from pathlib import Path

import pytest
from conftest import run_script

from make_synthetic_data import generate
from toolkit import data
from toolkit.layouts import parse_name, prepare_market_like


def names_under(folder: Path) -> dict[str, list[str]]:
    return {d.name: sorted(f.name for f in d.iterdir()) for d in sorted(folder.iterdir())}


def test_names_give_identity_and_camera():
    assert parse_name("0001001.png") == (1, 1) and parse_name("0001002.png") == (1, 1)
    assert parse_name("0971003.png") == (971, 2) and parse_name("0971004.png") == (971, 2)
    assert parse_name("0002_c1s1_000451_03.png") == (2, 1)  # other releases' names with other suffixes
    from toolkit.layouts import DatasetError
    for bad in ("0001005.png", "001001.png", "0001001.txt"):
        with pytest.raises(DatasetError):
            parse_name(bad)


def test_prepare_splits_and_idempotence(tmp_path):
    root = tmp_path / "CUHK01"
    r = run_script("make_synthetic_data.py", "--format", "cuhk01", "--ids", "9", "--out", root)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (root / "campus").iterdir())[:5] == [
        "0001001.png", "0001002.png", "0001003.png", "0001004.png", "0002001.png"]
    r = run_script("prepare_cuhk01.py", "--data_dir", root)
    assert r.returncode == 0, r.stderr
    out = root / "pytorch"
    train_all, train, val = (names_under(out / s) for s in ("train_all", "train", "val"))
    query, gallery = names_under(out / "query"), names_under(out / "gallery")
    assert len(train_all) == 9 and sum(map(len, train_all.values())) == 36  # every identity, every image
    assert sorted(train) == sorted(val) == [f"{i:04d}" for i in range(1, 5)]  # the first 9 // 2 ids train
    for pid in train:
        assert val[pid] == [f"{pid}001.png"] and train[pid] == [f"{pid}00{k}.png" for k in (2, 3, 4)]
    assert sorted(query) == sorted(gallery) == [f"{i:04d}" for i in range(5, 10)]
    assert all(q == [f"{pid}001.png", f"{pid}002.png"] for pid, q in query.items())  # camera 1
    assert all(g == [f"{pid}003.png", f"{pid}004.png"] for pid, g in gallery.items())  # camera 2
    assert os.stat(out / "query" / "0005" / "0005001.png").st_nlink >= 2
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = run_script("prepare_cuhk01.py", "--data_dir", root)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    # a raw image removed: its copies go, and the test loaders read the .png names
    (root / "campus" / "0009004.png").unlink()
    assert run_script("prepare_cuhk01.py", "--data_dir", root).returncode == 0
    assert not (out / "gallery" / "0009" / "0009004.png").exists()
    images = data.ReidImages(out / "gallery", data.test_transform((16, 8)))
    assert len(images) == 9 and set(images.cams) == {2} and images.labels[0] == 5


def test_prepare_errors_are_one_line(tmp_path):
    root = tmp_path / "CUHK01"
    generate("cuhk01", root, n_ids=2, per_id=4, n_cams=2, seed=0)
    (root / "campus" / "0001005.png").write_bytes(b"x")
    (root / "campus" / "Thumbs.db").write_bytes(b"x")  # not an image: ignored
    for data_dir, words in ((root, "malformed re-ID image name '0001005.png'"),
                            (tmp_path / "missing", "does not exist")):
        r = run_script("prepare_cuhk01.py", "--data_dir", data_dir)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr
    (root / "campus" / "0001005.png").unlink()
    for f in (root / "campus").glob("0002*"):
        f.unlink()  # one identity: it trains, nothing is left to test
    r = run_script("prepare_cuhk01.py", "--data_dir", root)
    assert r.returncode == 2 and "no images for the train and val split(s)" in r.stderr
    assert not (root / "pytorch").exists()
    bad = run_script("make_synthetic_data.py", "--format", "cuhk01", "--images_per_id", "6", "--out", tmp_path / "x")
    assert bad.returncode == 2 and "4 images per identity" in bad.stderr


def test_edge_merge_has_2424_classes(tmp_path):
    """Market (751 training ids), DukeMTMC-reID (702) and CUHK01 (971) at full identity counts, 4 tiny images
    per id: the merged train_all label space of the edge pipeline."""
    roots = {"Market": ("market", 1501), "DukeMTMC-reID": ("duke", 1403), "CUHK01": ("cuhk01", 971)}
    dirs = []
    for name, (fmt, ids) in roots.items():
        root = tmp_path / name
        generate(fmt, root, n_ids=ids, per_id=4, n_cams=2, seed=1)
        if fmt == "cuhk01":
            from toolkit.layouts import prepare_cuhk01
            prepare_cuhk01(root)
        else:
            prepare_market_like(root, fmt)
        dirs.append(root / "pytorch")
    merged = data.AnchorPositives(data.training_dirs(",".join(map(str, dirs)), True), data.test_transform((16, 8)))
    assert [s["ids"] for s in merged.sources] == [751, 702, 971]
    assert len(merged.classes) == 2424 == len(set(merged.classes))
    assert data.describe_sources(merged.sources) == "Market 751 + DukeMTMC-reID 702 + CUHK01 971 = 2424 classes"
