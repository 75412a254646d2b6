"""k-reciprocal re-ranking against the dense per-image transcription of the references; evaluate_gpu.py
--rerank and --show_ranks as a user runs them."""
import re
import sys

import numpy as np
import pytest
import scipy.io
from conftest import ROOT, run_script
from PIL import Image

import toolkit.rerank as rerank
from toolkit.rank_pictures import CELL_H, CELL_W, COLOURS, FRAME, cell_origin
from toolkit.ranking import EvaluationError
from toolkit.rerank import KReciprocal, RerankParams, evaluate_reranked, top_neighbours

sys.path.insert(0, str(ROOT / "benchmarks"))
from naive_eval import naive_query  # noqa: E402
from naive_rerank import naive_rerank  # noqa: E402


def clustered_case(rng, n_query=24, n_gallery=90, dims=8, ids=9):
    """Clusters per id, junk (-1) and distractors (0) in the gallery, query ids 8 and 9 without a match."""
    centres = rng.normal(size=(ids + 1, dims))

    def images(labels):
        f = centres[labels.clip(min=0)] + 0.6 * rng.normal(size=(len(labels), dims))
        return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)

    gl = rng.integers(-1, ids - 1, n_gallery)
    ql = rng.integers(1, ids + 1, n_query)
    return images(ql), ql, rng.integers(1, 4, n_query), images(gl), gl, rng.integers(1, 4, n_gallery)


def naive_metrics(final, ql, qc, gl, gc, protocol):
    """Ranked by ascending final distance, equal distances lower gallery index first (naive_query ranks by
    descending score with the larger index first, so it gets the reversed gallery)."""
    aps, firsts, inps = [], [], []
    for i in range(len(final)):
        ap, first, inp = naive_query(-final[i, ::-1], ql[i], qc[i], gl[::-1], gc[::-1], protocol)
        aps.append(ap), firsts.append(first), inps.append(inp)
    n = len(final) if protocol == "reference" else max(sum(f is not None for f in firsts), 1)
    out = {f"rank{k}": sum(f is not None and f < k for f in firsts) / n for k in (1, 5, 10)}
    out["mAP"] = sum(aps) / n
    if protocol == "standard":
        out["mINP"] = sum(inps) / n
    return out


PARAMS = [(20, 6, 0.3), (20, 1, 0.3), (4, 3, 0.3), (3, 1, 0.5), (7, 8, 0.0), (6, 2, 1.0)]


@pytest.mark.parametrize("variant", ["layumi", "transreid"])
def test_final_distances_and_metrics_equal_the_dense_transcription(variant, monkeypatch):
    if variant == "transreid":  # the query x gallery distances recomputed instead of kept from the first pass
        monkeypatch.setattr(rerank, "QUERY_CACHE_BYTES", 0)
    rng = np.random.default_rng(11)
    for trial, (k1, k2, lam) in enumerate(PARAMS):
        qf, ql, qc, gf, gl, gc = clustered_case(rng)
        if variant == "transreid":  # not normalised: the squared Euclidean base distance sees the norms
            qf, gf = qf * rng.uniform(0.5, 2, (len(qf), 1)).astype(np.float32), gf * 1.5
        params = RerankParams(k1, k2, lam, variant)
        expected = naive_rerank(qf, gf, k1, k2, lam, variant)
        reranker = KReciprocal(qf, gf, params, chunk_elements=int(rng.integers(150, 3000)))
        ours = np.concatenate([reranker.final_distances(s, min(s + 5, len(qf))) for s in range(0, len(qf), 5)])
        assert np.abs(ours - expected).max() <= 1e-6, (trial, np.abs(ours - expected).max())
        both = evaluate_reranked(qf, ql, qc, gf, gl, gc, params, chunk_elements=int(rng.integers(150, 3000)))
        for protocol in ("reference", "standard"):
            want = naive_metrics(expected, ql, qc, gl, gc, protocol)
            for key, value in want.items():
                assert both[protocol][key] == pytest.approx(value, abs=1e-6), (trial, protocol, key)


def test_encoding_rows_sum_to_one_and_are_sparse():
    rng = np.random.default_rng(2)
    qf, _, _, gf, _, _ = clustered_case(rng, 30, 200)
    reranker = KReciprocal(qf, gf, RerankParams())
    sums = np.asarray(reranker.v.sum(1)).ravel()
    assert np.allclose(sums, 1, atol=1e-5)
    assert reranker.v.getnnz(1).max() < 230 / 2  # tens of terms, not N


def test_duplicated_images_tie_to_the_lower_index():
    d = np.array([[0.0, 0.5, 0.2, 0.2, 0.2, 0.9]], np.float32)
    assert top_neighbours(d, 2).tolist() == [[0, 2, 3]]  # 2, 3, 4 tie at the boundary: 2 and 3 are in
    assert top_neighbours(d, 3).tolist() == [[0, 2, 3, 4]]
    rng = np.random.default_rng(5)
    qf, ql, qc, gf, gl, gc = clustered_case(rng, 10, 40)
    gf = np.concatenate([gf, gf[:10]])  # exact duplicates: equal distances everywhere
    gl, gc = np.concatenate([gl, gl[:10]]), np.concatenate([gc, gc[:10]])
    ours = KReciprocal(qf, gf, RerankParams(5, 3, 0.3)).final_distances(0, len(qf))
    assert np.abs(ours - naive_rerank(qf, gf, 5, 3, 0.3)).max() <= 1e-6


def test_parameters_are_checked():
    qf = np.eye(4, dtype=np.float32)
    for params, words in ((RerankParams(k1=5), "more than 5"), (RerankParams(1, 3), "at most k1 + 1"),
                          (RerankParams(1, 1, 1.5), "lambda"), (RerankParams(1, 1, 0.3, "x"), "variant")):
        with pytest.raises(EvaluationError, match=re.escape(words)):
            KReciprocal(qf[:2], qf[2:], params)


def write_mat(path, case, paths=None):
    qf, ql, qc, gf, gl, gc = case
    arrays = {"query_f": qf, "query_label": ql, "query_cam": qc, "gallery_f": gf, "gallery_label": gl,
              "gallery_cam": gc}
    if paths:
        arrays.update(query_path=np.asarray(paths[0]), gallery_path=np.asarray(paths[1]))
    scipy.io.savemat(path, arrays)


def test_script_rerank_line_and_json(tmp_path):
    import json
    case = clustered_case(np.random.default_rng(3))
    write_mat(tmp_path / "r.mat", case)
    r = run_script("evaluate_gpu.py", "--mat", tmp_path / "r.mat", "--rerank", "--k1", "6", "--k2", "3",
                   "--protocol", "standard", "--json", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    want = evaluate_reranked(*case, RerankParams(6, 3, 0.3))["standard"]
    assert r.stdout.startswith("re-ranked Rank@1_%f" % want["rank1"])
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["mAP"] == pytest.approx(want["mAP"]) and saved["rerank"] == {"k1": 6, "k2": 3, "lambda": 0.3}
    plain = run_script("evaluate_gpu.py", "--mat", tmp_path / "r.mat", "--protocol", "standard")
    assert plain.returncode == 0 and plain.stdout.split()[0] != r.stdout.split()[1]  # re-ranking changed the ranks


def test_rank_picture_frames_follow_the_matches(tmp_path):
    rng = np.random.default_rng(4)
    qf, ql, qc, gf, gl, gc = clustered_case(rng, 6, 30)
    gl[:3], gc[:3] = -1, 1  # junk images
    names = []
    for split, n in (("q", len(qf)), ("g", len(gf))):
        for i in range(n):
            Image.new("RGB", (32, 64), (int(rng.integers(0, 255)), 40, 40)).save(tmp_path / f"{split}{i}.png")
        names.append([str(tmp_path / f"{split}{i}.png") for i in range(n)])
    write_mat(tmp_path / "r.mat", (qf, ql, qc, gf, gl, gc), names)
    r = run_script("evaluate_gpu.py", "--mat", tmp_path / "r.mat", "--show_ranks", tmp_path / "ranks.png",
                   "--queries", "4", "--top", "5", "--seed", "1")
    assert r.returncode == 0, r.stderr
    picture = np.asarray(Image.open(tmp_path / "ranks.png").convert("RGB"))
    last_x, last_y = cell_origin(3, 5)
    assert picture.shape == (last_y + CELL_H + 2 * FRAME, last_x + CELL_W + 2 * FRAME, 3)
    chosen = np.sort(np.random.default_rng(1).choice(len(qf), 4, replace=False))
    for row, i in enumerate(chosen):
        order = np.lexsort((-np.arange(len(gf)), -(gf @ qf[i])))[:5]
        for column, j in enumerate(order, 1):
            junk = gl[j] == -1 or (gl[j] == ql[i] and gc[j] == qc[i])
            kind = "junk" if junk else "match" if gl[j] == ql[i] else "wrong"
            x, y = cell_origin(row, column)
            assert tuple(picture[y + 1, x + 1]) == COLOURS[kind], (row, column)
        x, y = cell_origin(row, 0)
        assert tuple(picture[y + 1, x + 1]) == COLOURS["query"]
    again = run_script("evaluate_gpu.py", "--mat", tmp_path / "r.mat", "--show_ranks", tmp_path / "ranks.png")
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_worst_queries_and_reranked_picture(tmp_path):
    rng = np.random.default_rng(6)
    case = clustered_case(rng, 8, 40)
    names = []
    for split, n in (("q", 8), ("g", 40)):
        for i in range(n):
            Image.new("RGB", (16, 32), (10 * i % 255, 0, 0)).save(tmp_path / f"{split}{i}.jpg")
        names.append([str(tmp_path / f"{split}{i}.jpg") for i in range(n)])
    write_mat(tmp_path / "r.mat", case, names)
    r = run_script("evaluate_gpu.py", "--mat", tmp_path / "r.mat", "--show_ranks", tmp_path / "w.png", "--worst",
                   "--queries", "2", "--rerank", "--k1", "5", "--k2", "2")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "w.png").size[1] == cell_origin(1, 0)[1] + CELL_H + 2 * FRAME


def test_script_errors_are_one_line(tmp_path):
    case = clustered_case(np.random.default_rng(8), 5, 20)
    write_mat(tmp_path / "old.mat", case)
    for args, words in ((["--show_ranks", tmp_path / "x.png"], "re-run test.py"),
                        (["--k1", "20"], "without --rerank"), (["--worst"], "without --show_ranks"),
                        (["--rerank", "--k1", "2", "--k2", "9"], "at most --k1 + 1"),
                        (["--rerank", "--k1", "40"], "more than 40"),
                        (["--show_ranks", tmp_path / "x.jpg"], "PNG"),
                        (["--json", tmp_path / "old.mat"], "input")):
        r = run_script("evaluate_gpu.py", "--mat", tmp_path / "old.mat", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], \
            (args, r.stderr)
    assert not (tmp_path / "x.png").exists()


def test_transreid_test_re_ranks_with_its_own_values(tiny_transreid_run, synthetic_occ_duke, tmp_path):
    import json

    from conftest import TINY_CFG

    from toolkit.rerank import TRANSREID_PARAMS
    common = ["--config_file", TINY_CFG, "DATASETS.ROOT_DIR", synthetic_occ_duke, "TEST.WEIGHT",
              tiny_transreid_run / "transformer_2.pth"]
    r = run_script("-m transreid.test", *common, "TEST.RE_RANKING", "True", "--mat", tmp_path / "f.mat",
                   "--json", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    assert "re-ranked: k1 50, k2 15, lambda 0.3" in r.stdout
    mat = scipy.io.loadmat(tmp_path / "f.mat")  # FEAT_NORM yes: the normalised features TransReID re-ranks
    case = [mat[k].squeeze() if not k.endswith("_f") else mat[k] for k in
            ("query_f", "query_label", "query_cam", "gallery_f", "gallery_label", "gallery_cam")]
    want = evaluate_reranked(*case, TRANSREID_PARAMS)["standard"]
    got = json.loads((tmp_path / "m.json").read_text())
    assert got["mAP"] == pytest.approx(want["mAP"], abs=1e-9) and got["mINP"] == pytest.approx(want["mINP"], abs=1e-9)
    plain = run_script("-m transreid.test", *common, "--json", tmp_path / "p.json")
    assert plain.returncode == 0 and json.loads((tmp_path / "p.json").read_text())["mAP"] != got["mAP"]
    assert str(mat["query_path"][0]).rstrip().endswith(".jpg")
