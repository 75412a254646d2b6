"""Merged multi-dataset training (--data_dir a,b) and the softmax + circle recipe with warm-up."""
import argparse

import pytest
import torch

from make_synthetic_data import generate
from toolkit import data, train_loop
from toolkit.layouts import prepare_market_like


@pytest.fixture(scope="module")
def synthetic_duke(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "Duke"
    generate("duke", root, n_ids=5, per_id=6, n_cams=3, seed=4)
    prepare_market_like(root, "duke")
    return root


def test_merged_sources_get_disjoint_labels_and_counts_add_up(synthetic_market, synthetic_duke):
    a, b = synthetic_market / "pytorch" / "train_all", synthetic_duke / "pytorch" / "train_all"
    alone = [data.AnchorPositives(r, data.test_transform((64, 32))) for r in (a, b)]
    merged = data.AnchorPositives([a, b], data.test_transform((64, 32)))
    assert len(merged) == len(alone[0]) + len(alone[1])
    assert len(merged.classes) == len(alone[0].classes) + len(alone[1].classes)
    assert len(set(merged.classes)) == len(merged.classes)
    # the two datasets share folder names such as '0002'; merged, their labels never meet
    shared = set(alone[0].classes) & set(alone[1].classes)
    assert shared, "the synthetic datasets should reuse id numbers for this test to mean something"
    first = {label for path, label in merged.samples if a in path.parents}
    second = {label for path, label in merged.samples if b in path.parents}
    assert not first & second
    assert first == set(range(len(alone[0].classes)))
    assert second == set(range(len(alone[0].classes), len(merged.classes)))
    # every image keeps its own identity: labels map back to the source's folder name
    for path, label in merged.samples:
        assert merged.classes[label].endswith("/" + path.parent.name)
    assert [s["ids"] for s in merged.sources] == [len(x.classes) for x in alone]
    assert [s["images"] for s in merged.sources] == [len(x) for x in alone]
    assert data.dataset_name(f"{synthetic_market / 'pytorch'},{synthetic_duke / 'pytorch'}") == "Market+Duke"


def test_softmax_circle_training_on_merged_data_with_warmup(synthetic_market, synthetic_duke, tmp_path,
                                                            monkeypatch, capsys):
    argv = ["--data_dir", f"{synthetic_market / 'pytorch'},{synthetic_duke / 'pytorch'}", "--train_all",
            "--network_arch", "resnet18", "--no_pretrained", "--Epochs", "2", "--batchsize", "8", "--height", "64",
            "--width", "32", "--workers", "0", "--lr", "0.05", "--results_dir", str(tmp_path), "--name", "run",
            "--loss", "softmax+circle", "--warm_epoch", "1"]
    args = train_loop.add_training_args(argparse.ArgumentParser()).parse_args(argv)
    seen = []
    step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: (seen.append(self.param_groups[1]["lr"]),
                                                                         step(self, *a, **k))[1])
    torch.manual_seed(0)
    net = train_loop.train(args)
    out = capsys.readouterr().out
    ids = [len(data.AnchorPositives(r / "pytorch" / "train_all", None).classes)
           for r in (synthetic_market, synthetic_duke)]
    assert f"Market/pytorch/train_all: {ids[0]} ids" in out and f"Duke/pytorch/train_all: {ids[1]} ids" in out
    assert f"{sum(ids)} classes" in out
    assert net.classifier.classifier[0].weight.shape[0] == sum(ids)
    steps = len(seen) // 2
    expected = [0.05 * train_loop.warmup_factor(s, steps) for s in range(2 * steps)]
    assert seen == pytest.approx(expected)
    assert seen[0] == pytest.approx(0.005) and seen[-1] == pytest.approx(0.05)
    log = (tmp_path / "ft_resnet18" / "run" / "log.csv").read_text().splitlines()
    header = log[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in log[1:]]
    assert all(0 <= float(r["id_accuracy"]) <= 1 for r in rows)
    assert float(rows[1]["id_accuracy"]) > float(rows[0]["id_accuracy"])  # the classifier learns
