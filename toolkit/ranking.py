"""The torch-free evaluation core: Rank-k, mAP and mINP of query features against a gallery.

Ranking: gallery sorted by descending score = gallery . query (float32); equal scores are ordered with
the larger gallery index first (the reverse of a stable ascending sort, as the reference's argsort
then [::-1] does on small inputs), or the lower index first for distances turned into scores
(re-ranking). Junk = label -1, and the query's id in the query's camera.
No query x gallery matrix is ever sorted or held whole: per chunk of queries, only gallery items that
score at least as high as the query's worst good match are compared, as exact (score, index) int64 keys.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from toolkit.errors import UserError

INT64_MAX = np.iinfo(np.int64).max
CHUNK_ELEMENTS = 1 << 25  # query x gallery scores per chunk (128 MB of float32; big chunks keep the GEMM efficient)
RESULT_KEYS = ("gallery_f", "gallery_label", "gallery_cam", "query_f", "query_label", "query_cam")
PATH_KEYS = ("query_path", "gallery_path")  # optional: the image files, for pictures of rank lists


class EvaluationError(UserError):
    """A user-facing problem with the result files; printed as one line."""


def image_paths(paths: list) -> np.ndarray:
    """Image paths as a result .mat stores them: a char matrix (scipy pads it with spaces on reading)."""
    return np.asarray([str(p) for p in paths], dtype=str) if paths else np.zeros(0, dtype="<U1")


def ordered_keys(scores: np.ndarray, index: np.ndarray, n_gallery: int,
                 lower_index_first: bool = False) -> np.ndarray:
    """Non-negative int64 keys ordered as (score, gallery index): unique, so comparisons are exact.

    A larger key ranks higher. Equal scores: the larger gallery index ranks higher, or the lower one
    with lower_index_first. Keys lie in [0, 2**32 * n_gallery).
    """
    bits = (np.asarray(scores, np.float32) + np.float32(0.0)).view(np.int32)  # + 0.0 maps -0.0 to +0.0
    monotone = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits).astype(np.int64) + 2 ** 31
    return monotone * n_gallery + (n_gallery - 1 - index if lower_index_first else index)


class GalleryIndex:
    """The gallery without its junk (-1) images, grouped by id so that each query finds its own id's
    images without scanning the gallery. Filtering keeps the gallery order, hence the tie rule."""

    def __init__(self, gf: np.ndarray, gl: np.ndarray, gc: np.ndarray):
        self.keep = keep = gl != -1
        self.f, self.label, self.cam = gf[keep], gl[keep], gc[keep]
        self.order = np.argsort(self.label, kind="stable")
        self.ids, self.counts = np.unique(self.label[self.order], return_counts=True)
        self.starts = self.counts.cumsum() - self.counts
        self.width = int(self.counts.max()) if len(self.counts) else 0

    def same_id(self, ql: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(gallery positions, valid) of each query's id, padded to the largest of these queries' ids:
        (queries, width). Padding to these ids only matters: distractors (id 0) are often the largest."""
        pos = np.searchsorted(self.ids, ql).clip(max=len(self.ids) - 1)
        count = np.where(self.ids[pos] == ql, self.counts[pos], 0)
        col = np.arange(max(int(count.max()), 1))
        valid = col[None, :] < count[:, None]
        slot = (self.starts[pos][:, None] + col[None, :]).clip(max=len(self.order) - 1)
        return self.order[slot], valid


def good_match_ranks(scores: np.ndarray, same_idx: np.ndarray, good: np.ndarray,
                     own_id: Callable[[np.ndarray, np.ndarray], np.ndarray],
                     lower_index_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks (among non-junk gallery items) of each query's good matches, best first.

    scores: (queries, gallery) without junk -1 items; same_idx: each query's own-id gallery positions
    (padded), good: which of them are good matches; own_id(rows, cols): True where gallery item `cols`
    has the id of query `rows` (good or junk: never counted as an other item). Only gallery items
    scoring at least the query's worst good match can rank above a good match, so only those are looked at.
    Returns (ranks, valid), both (queries, width).
    """
    n_q, n_g = scores.shape
    width = same_idx.shape[1]
    same_scores = np.take_along_axis(scores, same_idx, 1)
    good_keys = np.sort(np.where(good, ordered_keys(same_scores, same_idx, n_g, lower_index_first), INT64_MAX),
                        axis=1)
    n_good = good.sum(1)
    worst = np.where(good, same_scores, np.float32(np.inf)).min(1)
    flat_index = np.flatnonzero(scores >= worst[:, None])
    rows, cols = np.divmod(flat_index, n_g)
    other = ~own_id(rows, cols)
    rows, cols, flat_index = rows[other], cols[other], flat_index[other]
    keys = ordered_keys(scores.reshape(-1)[flat_index], cols, n_g, lower_index_first)
    # per item: how many good matches of its own query it beats, found by one flat searchsorted on
    # (row, key) pairs packed into int64 (row * span + key; span * queries < 2**63 for our chunk sizes)
    span = 2 ** 32 * n_g
    row_ids = np.arange(n_q, dtype=np.int64)[:, None]
    flat = np.where(good_keys == INT64_MAX, INT64_MAX, row_ids * span + good_keys).reshape(-1)
    flat = flat[flat != INT64_MAX]  # rows ascending, keys ascending within a row: sorted
    offset = n_good.cumsum() - n_good
    beaten = np.searchsorted(flat, rows * span + keys) - offset[rows]
    hist = np.bincount(rows * (width + 1) + beaten, minlength=n_q * (width + 1)).reshape(n_q, width + 1)
    above = hist[:, ::-1].cumsum(1)[:, ::-1]  # above[:, p] = items beating at least p good matches
    i = np.arange(width)
    p = (n_good[:, None] - 1 - i).clip(min=0)  # ascending position of the i-th best good match
    valid = i[None, :] < n_good[:, None]
    ranks = np.take_along_axis(above, (p + 1).clip(max=width), 1) + i
    return np.where(valid, ranks, 0), valid


def average_precision(ranks: np.ndarray, valid: np.ndarray, protocol: str) -> np.ndarray:
    """AP per query (0 for a query with no good match)."""
    r = ranks.astype(np.float64)
    n_good = valid.sum(1, keepdims=True).clip(min=1).astype(np.float64)
    i = np.arange(ranks.shape[1], dtype=np.float64)[None, :]
    precision = (i + 1) / (r + 1)
    if protocol == "reference":  # trapezoid: mean of the precision before and at each hit
        old = np.where(r == 0, 1.0, i / r.clip(min=1))
        precision = (old + precision) / 2
    return (precision * valid / n_good).sum(1)


def _as_features(x, what: str) -> np.ndarray:
    f = np.asarray(x, dtype=np.float32)
    if f.ndim != 2:
        raise EvaluationError(f"{what} features must be a (images, dims) matrix, got shape {f.shape}")
    if not np.isfinite(f).all():
        bad = int((~np.isfinite(f).all(1)).sum())
        raise EvaluationError(f"{what} features of {bad} image(s) are NaN or infinite "
                              "(did training diverge?); refusing to score them")
    return f


def _as_ids(x, n: int, what: str) -> np.ndarray:
    a = np.asarray(x).reshape(-1)
    if len(a) != n:
        raise EvaluationError(f"{what} has {len(a)} entries for {n} feature rows")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not np.issubdtype(a.dtype, np.number) or not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise EvaluationError(f"{what} must hold integers")
    return a.astype(np.int64)


def check_inputs(query_f, query_label, query_cam, gallery_f, gallery_label, gallery_cam) -> tuple[np.ndarray, ...]:
    """The six arrays as NumPy, after the checks that keep a broken result file from being scored."""
    qf, gf = _as_features(query_f, "query"), _as_features(gallery_f, "gallery")
    if len(qf) == 0:
        raise EvaluationError("the query set is empty")
    if len(gf) == 0:
        raise EvaluationError("the gallery is empty")
    if qf.shape[1] != gf.shape[1]:
        raise EvaluationError(f"query features have {qf.shape[1]} dims, gallery features {gf.shape[1]}")
    ql, qc = _as_ids(query_label, len(qf), "query_label"), _as_ids(query_cam, len(qf), "query_cam")
    gl, gc = _as_ids(gallery_label, len(gf), "gallery_label"), _as_ids(gallery_cam, len(gf), "gallery_cam")
    return qf, ql, qc, gf, gl, gc


def block_score_function(a: np.ndarray, b: np.ndarray, device: str) -> Callable[[slice, slice], np.ndarray]:
    """scores(rows, cols) = a[rows] . b[cols], float32, as a NumPy array; on CUDA the product runs on the GPU
    (torch is imported only then)."""
    if device == "cpu":
        return lambda rows, cols: a[rows] @ b[cols].T  # BLAS reads the transpose in place
    try:
        import torch
    except ImportError:
        raise EvaluationError(f"--device {device} needs torch, which is not installed") from None
    if not torch.cuda.is_available():
        raise EvaluationError(f"--device {device}: CUDA is not available on this machine")
    try:
        a_d = torch.from_numpy(a).to(device)
        b_d = a_d if b is a else torch.from_numpy(b).to(device)
    except (RuntimeError, AssertionError) as e:
        raise EvaluationError(f"--device {device}: {str(e).splitlines()[0]}") from None
    return lambda rows, cols: (a_d[rows] @ b_d[cols].T).cpu().numpy()


def score_function(qf: np.ndarray, gf: np.ndarray, device: str) -> Callable[[int, int], np.ndarray]:
    """scores(s, e) = query rows s..e . gallery, float32, as a NumPy array (see block_score_function)."""
    products = block_score_function(qf, gf, device)
    return lambda s, e: products(slice(s, e), slice(None))


ChunkScores = Callable[[int, int], np.ndarray]


def query_results(qf: np.ndarray, ql: np.ndarray, qc: np.ndarray, gallery: GalleryIndex, scores_of: ChunkScores,
                  chunk: int, lower_index_first: bool = False) -> dict[str, np.ndarray]:
    """Per query: AP under both protocols, the rank of the first good match (INT64_MAX if none), INP, and
    whether it has a good match. scores_of(s, e): queries s..e against the non-junk gallery, higher first."""
    first_hit, inp, has_match = [], [], []
    ap = {"reference": [], "standard": []}
    for s in range(0, len(qf), chunk):
        e = min(s + chunk, len(qf))
        if gallery.width == 0:  # every gallery image is junk: no query has a match
            ranks, valid = np.zeros((e - s, 1), np.int64), np.zeros((e - s, 1), bool)
        else:
            same_idx, same_valid = gallery.same_id(ql[s:e])
            good = same_valid & (gallery.cam[same_idx] != qc[s:e, None])
            chunk_labels = ql[s:e]
            ranks, valid = good_match_ranks(scores_of(s, e), same_idx, good,
                                            lambda r, c: gallery.label[c] == chunk_labels[r], lower_index_first)
        n_good = valid.sum(1)
        has_match.append(n_good > 0)
        first_hit.append(np.where(n_good > 0, ranks[:, 0], INT64_MAX))
        for protocol, aps in ap.items():
            aps.append(average_precision(ranks, valid, protocol))
        last = np.take_along_axis(ranks, (n_good - 1).clip(min=0)[:, None], 1)[:, 0]
        inp.append(np.where(n_good > 0, n_good / (last + 1.0), 0.0))
    out = {f"ap_{protocol}": np.concatenate(aps) for protocol, aps in ap.items()}
    out.update(first_hit=np.concatenate(first_hit), inp=np.concatenate(inp), has_match=np.concatenate(has_match))
    return out


def summarize(per_query: dict[str, np.ndarray]) -> dict[str, dict]:
    """{"reference": metrics, "standard": metrics} from `query_results`."""
    n_query, first_hit = len(per_query["has_match"]), per_query["first_hit"]
    n_valid = int(per_query["has_match"].sum())
    results = {}
    for protocol in ("reference", "standard"):
        denominator = n_query if protocol == "reference" else max(n_valid, 1)
        # CMC as the reference computes it: integer counts divided in float32
        cmc = {n: float(np.float32((first_hit < n).sum()) / np.float32(denominator)) for n in (1, 5, 10)}
        results[protocol] = {"rank1": cmc[1], "rank5": cmc[5], "rank10": cmc[10],
                             "mAP": float(per_query[f"ap_{protocol}"].sum()) / denominator,
                             "num_query": n_query, "num_valid": n_valid}
    results["standard"]["mINP"] = float(per_query["inp"].sum()) / max(n_valid, 1)
    return results


def feature_query_results(qf: np.ndarray, ql: np.ndarray, qc: np.ndarray, gf: np.ndarray, gl: np.ndarray,
                          gc: np.ndarray, device: str | None = None,
                          chunk_elements: int = CHUNK_ELEMENTS) -> dict[str, np.ndarray]:
    """`query_results` of checked arrays (see `check_inputs`) ranked by the dot product of their features."""
    gallery = GalleryIndex(gf, gl, gc)
    scores_of = score_function(qf, gallery.f, str(device or "cpu"))
    return query_results(qf, ql, qc, gallery, scores_of, max(1, chunk_elements // max(len(gallery.f), 1)))


def evaluate_protocols(query_f, query_label, query_cam, gallery_f, gallery_label, gallery_cam,
                       device: str | None = None, chunk_elements: int = CHUNK_ELEMENTS) -> dict[str, dict]:
    """{"reference": metrics, "standard": metrics} from one ranking pass (see `evaluate`)."""
    arrays = check_inputs(query_f, query_label, query_cam, gallery_f, gallery_label, gallery_cam)
    return summarize(feature_query_results(*arrays, device, chunk_elements))


def evaluate(query_f, query_label, query_cam, gallery_f, gallery_label, gallery_cam,
             protocol: str = "reference", device: str | None = None,
             chunk_elements: int = CHUNK_ELEMENTS) -> dict:
    """Rank-1/5/10, mAP (and mINP for the standard protocol) of features against a gallery.

    reference: CMC and mAP are divided by the number of ALL queries (no-match queries add 0).
    standard:  AP = mean precision at each hit, mINP, averages over queries with a good match.
    Inputs: arrays (or CPU tensors); device: "cpu" (default) or a CUDA device for the score products.
    """
    if protocol not in ("reference", "standard"):
        raise EvaluationError(f"unknown protocol {protocol!r}")
    return evaluate_protocols(query_f, query_label, query_cam, gallery_f, gallery_label, gallery_cam,
                              device, chunk_elements)[protocol]


def format_result(result: dict, protocol: str = "reference") -> str:
    line = "Rank@1_%f_Rank@5_%f_Rank@10_%f_mAP_%f" % (result["rank1"], result["rank5"], result["rank10"],
                                                      result["mAP"])
    return line + ("_mINP_%f" % result["mINP"] if protocol == "standard" else "")


def multi_query_features(query_label, query_cam, mquery_f, mquery_label, mquery_cam, query_f) -> np.ndarray:
    """Each query's feature replaced by the mean of the multi-query images of its id and camera.

    A query whose (id, camera) has no multi-query image keeps its own feature.
    """
    own = _as_features(query_f, "query")
    mf = _as_features(mquery_f, "multi-query")
    ql, qc = _as_ids(query_label, len(own), "query_label"), _as_ids(query_cam, len(own), "query_cam")
    ml, mc = _as_ids(mquery_label, len(mf), "mquery_label"), _as_ids(mquery_cam, len(mf), "mquery_cam")
    if len(mf) and mf.shape[1] != own.shape[1]:
        raise EvaluationError(f"multi-query features have {mf.shape[1]} dims, query features {own.shape[1]}")
    groups, inverse = np.unique(ml * 1000 + mc, return_inverse=True)
    if len(groups) == 0:
        return own
    sums = np.zeros((len(groups), mf.shape[1]), np.float32)
    np.add.at(sums, inverse, mf)
    means = sums / np.bincount(inverse, minlength=len(groups))[:, None].astype(np.float32)
    qkey = ql * 1000 + qc
    pos = np.searchsorted(groups, qkey).clip(max=len(groups) - 1)
    found = groups[pos] == qkey
    return np.where(found[:, None], means[pos], own)


def load_mat(path: str | os.PathLike, keys) -> dict:
    import scipy.io
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path} does not exist (run test.py first)")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises many kinds for a truncated or foreign file
        raise EvaluationError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    missing = [k for k in keys if k not in mat]
    if missing:
        raise EvaluationError(f"{path} lacks the keys {', '.join(missing)}")
    return mat


MULTI_KEYS = ("mquery_f", "mquery_label", "mquery_cam")


def multi_query_file(mat_path: str | os.PathLike, multi_mat: str | os.PathLike | None = None
                     ) -> tuple[Path, bool] | None:
    """(the multi-query file of a result file: `multi_mat`, else multi_query.mat beside it; whether it is
    current, i.e. not older than the result file), or None when there is none."""
    multi_file = Path(multi_mat or Path(mat_path).with_name("multi_query.mat"))
    if not multi_file.is_file():
        return None
    return multi_file, multi_file.stat().st_mtime >= Path(mat_path).stat().st_mtime


def multi_query_of(multi_file: Path, query: tuple) -> np.ndarray:
    """The multi-query features of the (features, labels, cameras) queries, from test.py --multi's file."""
    m = load_mat(multi_file, MULTI_KEYS)
    try:
        return multi_query_features(query[1], query[2], m["mquery_f"], m["mquery_label"], m["mquery_cam"], query[0])
    except EvaluationError as e:
        raise EvaluationError(f"{multi_file}: {e}") from None


def both_protocols(result: dict, both: dict, protocol: str) -> dict:
    """`result` (the metrics of `protocol`) with the other protocol's under its name, as --json writes it."""
    other = "standard" if protocol == "reference" else "reference"
    return {**result, other: both[other], "protocol": protocol}


def mat_metrics(mat_path: str | os.PathLike, protocol: str = "reference") -> dict:
    """What `evaluate_gpu.py --json` writes for a test.py result file: the metrics of `protocol`, the other
    protocol's under its name, and the multi-query ones when multi_query.mat lies beside it."""
    mat = load_mat(mat_path, RESULT_KEYS)
    q = (mat["query_f"], mat["query_label"], mat["query_cam"])
    try:
        arrays = check_inputs(*q, mat["gallery_f"], mat["gallery_label"], mat["gallery_cam"])
        both = summarize(feature_query_results(*arrays))
    except EvaluationError as e:
        raise EvaluationError(f"{mat_path}: {e}") from None
    result = both_protocols(both[protocol], both, protocol)
    found = multi_query_file(mat_path)
    if found is not None and found[1]:
        mq = multi_query_of(found[0], q)
        result["multi"] = summarize(feature_query_results(mq, *arrays[1:]))[protocol]
    return result
