"""evaluate() against an independent per-query brute force; the script's output lines and errors."""
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from conftest import ROOT, run_script
from evaluate_gpu import evaluate, multi_query_features

sys.path.insert(0, str(ROOT / "benchmarks"))
from naive_eval import naive_evaluate  # noqa: E402


def random_case(rng, ties: bool):
    q, g, d = int(rng.integers(1, 25)), int(rng.integers(1, 70)), 6
    qf, gf = rng.normal(size=(q, d)).astype(np.float32), rng.normal(size=(g, d)).astype(np.float32)
    if ties:  # integer features: many exactly equal scores
        qf, gf = np.round(qf), np.round(gf)
    gl = rng.integers(-1, 6, g)  # -1 junk, 0 distractor
    ql = rng.integers(1, 8, q)  # ids 6, 7 never in the gallery: no good match
    return qf, ql, rng.integers(1, 4, q), gf, gl, rng.integers(1, 4, g)


@pytest.mark.parametrize("protocol", ["reference", "standard"])
def test_matches_brute_force(protocol):
    rng = np.random.default_rng(7)
    for trial in range(80):
        case = random_case(rng, ties=trial % 2 == 0)
        ours = evaluate(*case, protocol=protocol, chunk_elements=int(rng.integers(1, 400)), device="cpu")
        expected = naive_evaluate(*case, protocol=protocol)
        for key, value in expected.items():
            assert ours[key] == pytest.approx(value, abs=1e-7), (trial, key)  # CMC is float32, as in the reference


def test_hand_computed_case():
    # gallery scores for the single query: [0.9, 0.8, 0.7, 0.6, 0.5]
    gf = np.array([[0.9], [0.8], [0.7], [0.6], [0.5]], np.float32)
    qf = np.array([[1.0]], np.float32)
    gl = np.array([3, 1, 1, -1, 1])  # junk at rank 3
    gc = np.array([2, 1, 2, 2, 2])  # id 1 in camera 1 (same as the query) is junk
    r = evaluate(qf, [1], [1], gf, gl, gc, "reference", device="cpu")
    # after junk removal: [id3, id1(good), id1(good)] -> good ranks 1 and 2 (0-based)
    # trapezoid: old precision at rank r (0-based) is i / r, i.e. 0 / 1 for the first hit at rank 1
    ap = 0.5 * ((0 + 1 / 2) / 2) + 0.5 * ((1 / 2 + 2 / 3) / 2)
    assert r["mAP"] == pytest.approx(ap) and r["rank1"] == 0 and r["rank5"] == 1
    s = evaluate(qf, [1], [1], gf, gl, gc, "standard", device="cpu")
    assert s["mAP"] == pytest.approx((0.5 + 2 / 3) / 2) and s["mINP"] == pytest.approx(2 / 3)


def test_no_match_queries_count_as_zero_in_reference_protocol():
    gf = np.array([[1, 0], [0.5, 0], [-1, 0]], np.float32)
    qf = np.array([[1, 0], [0, 1]], np.float32)
    gl, gc = np.array([1, 1, 2]), np.array([2, 3, 1])  # query 0 finds both id-1 images first
    ref = evaluate(qf, [1, 9], [1, 1], gf, gl, gc, "reference", device="cpu")
    std = evaluate(qf, [1, 9], [1, 1], gf, gl, gc, "standard", device="cpu")
    assert ref["rank1"] == pytest.approx(0.5) and ref["mAP"] == pytest.approx(0.5)
    assert std["rank1"] == 1 and std["mAP"] == 1 and std["num_valid"] == 1


def test_ties_rank_larger_gallery_index_first():
    gf = np.ones((3, 2), np.float32)  # all scores equal
    qf = np.ones((1, 2), np.float32)
    # good match at gallery index 0: the two others (higher indices) come first
    r = evaluate(qf, [1], [1], gf, [1, 2, 3], [2, 1, 1], "standard", device="cpu")
    assert r["mAP"] == pytest.approx(1 / 3) and r["rank1"] == 0 and r["rank5"] == 1


def test_multi_query_mean_and_fallback():
    mq = multi_query_features([1, 2], [1, 1], np.array([[1, 0], [3, 0], [5, 5]], np.float32),
                              [1, 1, 3], [1, 1, 1], np.array([[0, 1], [0, 7]], np.float32))
    assert mq.tolist() == [[2.0, 0.0], [0.0, 7.0]]


def test_script_lines_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    qf, ql, qc, gf, gl, gc = random_case(rng, ties=False)
    scipy.io.savemat(tmp_path / "pytorch_result.mat", {"query_f": qf, "query_label": ql, "query_cam": qc,
                                                      "gallery_f": gf, "gallery_label": gl, "gallery_cam": gc})
    res = run_script("evaluate_gpu.py", "--protocol", "standard", "--json", "m.json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    expected = naive_evaluate(qf, ql, qc, gf, gl, gc, "standard")
    assert res.stdout.strip() == "Rank@1_%f_Rank@5_%f_Rank@10_%f_mAP_%f_mINP_%f" % (
        expected["rank1"], expected["rank5"], expected["rank10"], expected["mAP"], expected["mINP"])
    assert (tmp_path / "m.json").is_file()
    scipy.io.savemat(tmp_path / "bad.mat", {"query_f": qf})
    bad = run_script("evaluate_gpu.py", "--mat", "bad.mat", cwd=tmp_path)
    assert bad.returncode == 2 and "lacks the keys" in bad.stderr
    missing = run_script("evaluate_gpu.py", "--mat", "nope.mat", cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
