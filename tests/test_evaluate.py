"""evaluate() against an independent per-query brute force; the script's output lines and errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
from conftest import ROOT, run_script

from evaluate_gpu import EvaluationError, evaluate, evaluate_protocols, multi_query_features

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


def test_cpu_path_never_imports_torch(tmp_path):
    """The whole command on the CPU: `python -X importtime` lists every module imported."""
    rng = np.random.default_rng(1)
    qf, ql, qc, gf, gl, gc = random_case(rng, ties=False)
    scipy.io.savemat(tmp_path / "pytorch_result.mat", {"query_f": qf, "query_label": ql, "query_cam": qc,
                                                      "gallery_f": gf, "gallery_label": gl, "gallery_cam": gc})
    res = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "evaluate_gpu.py"), "--json", "m.json"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "numpy" in imported and "json" in imported
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}


def test_both_protocols_from_one_pass_equal_separate_calls():
    rng = np.random.default_rng(3)
    for _ in range(10):
        case = random_case(rng, ties=True)
        both = evaluate_protocols(*case, chunk_elements=50)
        for protocol in ("reference", "standard"):
            assert both[protocol] == evaluate(*case, protocol=protocol)


def test_distractor_padding_does_not_change_results():
    """Per-chunk padding to the queries' own ids: a huge distractor group (id 0) is never a query's id."""
    rng = np.random.default_rng(5)
    qf, ql, qc, gf, gl, gc = random_case(rng, ties=False)
    gf = np.concatenate([gf, rng.normal(size=(300, gf.shape[1])).astype(np.float32)])
    gl, gc = np.concatenate([gl, np.zeros(300, int)]), np.concatenate([gc, rng.integers(1, 4, 300)])
    for protocol in ("reference", "standard"):
        expected = naive_evaluate(qf, ql, qc, gf, gl, gc, protocol)
        ours = evaluate(qf, ql, qc, gf, gl, gc, protocol, chunk_elements=700)
        assert all(ours[k] == pytest.approx(v, abs=1e-7) for k, v in expected.items())


def test_all_junk_gallery_scores_zero_not_error():
    qf = np.ones((2, 3), np.float32)
    r = evaluate(qf, [1, 2], [1, 1], np.ones((4, 3), np.float32), [-1] * 4, [1, 2, 3, 4], "reference")
    assert r["rank1"] == 0 and r["mAP"] == 0 and r["num_valid"] == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_refused_never_ranked_first(bad):
    """A NaN score must not count as a match: NaN features are an error, whichever side holds them."""
    gf = np.array([[1, 0], [0, 1], [0.5, 0.5]], np.float32)
    qf = np.array([[1, 0]], np.float32)
    q_bad, g_bad = qf.copy(), gf.copy()
    q_bad[0, 0] = bad
    g_bad[1, 1] = bad
    for q, g in ((q_bad, gf), (qf, g_bad)):
        with pytest.raises(EvaluationError, match="NaN or infinite"):
            evaluate(q, [1], [1], g, [2, 1, 3], [2, 2, 2])


@pytest.mark.parametrize("case, message", [
    ("labels_short", "gallery_label has 2 entries for 3 feature rows"),
    ("dims", "query features have 2 dims, gallery features 3"),
    ("empty_query", "the query set is empty"),
    ("cams_long", "query_cam has 2 entries for 1 feature rows"),
    ("float_labels", "query_label must hold integers"),
])
def test_inconsistent_arrays_are_one_line_errors(case, message):
    qf, ql, qc = np.ones((1, 2), np.float32), [1], [1]
    gf, gl, gc = np.ones((3, 2), np.float32), [1, 2, 3], [2, 2, 2]
    if case == "labels_short":
        gl = [1, 2]
    elif case == "dims":
        gf = np.ones((3, 3), np.float32)
    elif case == "empty_query":
        qf, ql, qc = np.zeros((0, 2), np.float32), [], []
    elif case == "cams_long":
        qc = [1, 2]
    elif case == "float_labels":
        ql = [1.5]
    with pytest.raises(EvaluationError, match=message):
        evaluate(qf, ql, qc, gf, gl, gc)


def test_default_multi_query_file_is_read(tmp_path):
    """multi_query.mat beside --mat is used when --multi_mat is not given."""
    rng = np.random.default_rng(2)
    qf, ql, qc, gf, gl, gc = random_case(rng, ties=False)
    scipy.io.savemat(tmp_path / "multi_query.mat", {"mquery_f": qf, "mquery_label": ql, "mquery_cam": qc})
    os.utime(tmp_path / "multi_query.mat", (1, 1e9))
    scipy.io.savemat(tmp_path / "pytorch_result.mat", {"query_f": qf, "query_label": ql, "query_cam": qc,
                                                      "gallery_f": gf, "gallery_label": gl, "gallery_cam": gc})
    os.utime(tmp_path / "pytorch_result.mat", (1, 1e9 - 10))
    res = run_script("evaluate_gpu.py", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and lines[1].startswith("multi Rank@1:")
