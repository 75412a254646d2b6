"""Rank-k, mAP and mINP from pytorch_result.mat (SPEC §6), vectorised over chunks of queries.

    python evaluate_gpu.py                        # ./pytorch_result.mat, reference protocol
    python evaluate_gpu.py --protocol standard    # also mINP; queries without a match are skipped

Ranking: gallery sorted by descending score = gallery . query (float32); equal scores are ordered with
the larger gallery index first (the reverse of a stable ascending sort, as the reference's argsort
then [::-1] does on small inputs). Junk = label -1, and the query's id in the query's camera.
No query x gallery matrix is ever sorted or held whole: per chunk of queries, only gallery items that
score at least as high as the query's worst good match are compared, as exact (score, index) int64 keys.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import scipy.io
import torch

INT64_MAX = torch.iinfo(torch.int64).max
CHUNK_ELEMENTS = 1 << 23  # query x gallery scores per chunk (32 MB of float32 + the sparse part)
RESULT_KEYS = ("gallery_f", "gallery_label", "gallery_cam", "query_f", "query_label", "query_cam")


class EvaluationError(Exception):
    """A user-facing problem with the result files; printed as one line."""


def ordered_keys(scores: torch.Tensor, index: torch.Tensor, n_gallery: int) -> torch.Tensor:
    """Non-negative int64 keys ordered as (score, gallery index): unique, so comparisons are exact.

    Keys lie in [0, 2**32 * n_gallery).
    """
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 maps -0.0 to +0.0
    monotone = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long() + 2 ** 31
    return monotone * n_gallery + index


class GalleryIndex:
    """The gallery without its junk (-1) images, grouped by id so that each query finds its own id's
    images without scanning the gallery. Filtering keeps the gallery order, hence the tie rule."""

    def __init__(self, gf: torch.Tensor, gl: torch.Tensor, gc: torch.Tensor):
        keep = gl != -1
        self.f, self.label, self.cam = gf[keep], gl[keep], gc[keep]
        self.order = torch.argsort(self.label, stable=True)
        self.ids, self.counts = torch.unique_consecutive(self.label[self.order], return_counts=True)
        self.starts = self.counts.cumsum(0) - self.counts
        self.width = int(self.counts.max()) if len(self.counts) else 0

    def same_id(self, ql: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gallery positions, valid) of each query's id, padded to the largest id: (queries, width)."""
        if self.width == 0:
            return torch.zeros(len(ql), 1, dtype=torch.long, device=ql.device), torch.zeros(len(ql), 1, dtype=bool,
                                                                                          device=ql.device)
        pos = torch.searchsorted(self.ids, ql).clamp(max=len(self.ids) - 1)
        count = torch.where(self.ids[pos] == ql, self.counts[pos], 0)
        col = torch.arange(self.width, device=ql.device)
        valid = col[None, :] < count[:, None]
        slot = (self.starts[pos][:, None] + col[None, :]).clamp(max=len(self.order) - 1)
        return self.order[slot], valid


def good_match_ranks(scores: torch.Tensor, same_idx: torch.Tensor, good: torch.Tensor, own_id: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks (among non-junk gallery items) of each query's good matches, best first.

    scores: (queries, gallery) without junk -1 items; same_idx: each query's own-id gallery positions
    (padded), good: which of them are good matches; own_id(rows, cols): True where gallery item `cols`
    has the id of query `rows` (good or junk: never counted as an other item). Only gallery items scoring at least the query's
    worst good match can rank above a good match, so only those are looked at.
    Returns (ranks, valid), both (queries, width).
    """
    n_q, n_g = scores.shape
    dev = scores.device
    width = same_idx.shape[1]
    same_scores = scores.gather(1, same_idx)
    good_keys = torch.where(good, ordered_keys(same_scores, same_idx, n_g), INT64_MAX).sort(1).values
    n_good = good.sum(1)
    worst = torch.where(good, same_scores, float("inf")).amin(1)
    rows, cols = (scores >= worst[:, None]).nonzero(as_tuple=True)
    other = ~own_id(rows, cols)
    rows, cols = rows[other], cols[other]
    keys = ordered_keys(scores[rows, cols], cols, n_g)
    # per item: how many good matches of its own query it beats, found by one flat searchsorted on
    # (row, key) pairs packed into int64 (row * span + key; span * queries < 2**63 for our chunk sizes)
    span = 2 ** 32 * n_g
    row_ids = torch.arange(n_q, device=dev)[:, None]
    flat = torch.where(good_keys == INT64_MAX, INT64_MAX, row_ids * span + good_keys).flatten()
    flat = flat[flat != INT64_MAX]  # rows ascending, keys ascending within a row: sorted
    offset = n_good.cumsum(0) - n_good
    beaten = torch.searchsorted(flat, rows * span + keys) - offset[rows]
    hist = torch.bincount(rows * (width + 1) + beaten, minlength=n_q * (width + 1)).view(n_q, width + 1)
    above = hist.flip(1).cumsum(1).flip(1)  # above[:, p] = items beating at least p good matches
    i = torch.arange(width, device=dev)
    p = (n_good[:, None] - 1 - i).clamp(min=0)  # ascending position of the i-th best good match
    valid = i[None, :] < n_good[:, None]
    ranks = above.gather(1, (p + 1).clamp(max=width)) + i
    return torch.where(valid, ranks, 0), valid


def average_precision(ranks: torch.Tensor, valid: torch.Tensor, protocol: str) -> torch.Tensor:
    """AP per query (0 for a query with no good match)."""
    r = ranks.double()
    n_good = valid.sum(1, keepdim=True).clamp(min=1).double()
    i = torch.arange(ranks.shape[1], device=ranks.device, dtype=torch.float64)[None, :]
    precision = (i + 1) / (r + 1)
    if protocol == "reference":  # trapezoid: mean of the precision before and at each hit
        old = torch.where(r == 0, torch.ones_like(r), i / r.clamp(min=1))
        precision = (old + precision) / 2
    return (precision * valid / n_good).sum(1)


def evaluate(query_f, query_label, query_cam, gallery_f, gallery_label, gallery_cam,
             protocol: str = "reference", device: str | torch.device | None = None,
             chunk_elements: int = CHUNK_ELEMENTS) -> dict:
    """Rank-1/5/10, mAP (and mINP for the standard protocol) of features against a gallery.

    reference: CMC and mAP are divided by the number of ALL queries (no-match queries add 0).
    standard:  AP = mean precision at each hit, mINP, averages over queries with a good match.
    """
    if protocol not in ("reference", "standard"):
        raise EvaluationError(f"unknown protocol {protocol!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    as_t = lambda x, dt: torch.as_tensor(np.asarray(x), dtype=dt).reshape(-1).to(device)  # noqa: E731
    qf = torch.as_tensor(np.asarray(query_f), dtype=torch.float32).to(device)
    gf = torch.as_tensor(np.asarray(gallery_f), dtype=torch.float32).to(device)
    ql, qc = as_t(query_label, torch.int64), as_t(query_cam, torch.int64)
    gl, gc = as_t(gallery_label, torch.int64), as_t(gallery_cam, torch.int64)
    n_query = len(qf)
    gallery = GalleryIndex(gf, gl, gc)
    chunk = max(1, chunk_elements // max(len(gallery.f), 1))
    first_hit, ap, inp, has_match = [], [], [], []
    for s in range(0, n_query, chunk):
        e = min(s + chunk, n_query)
        same_idx, same_valid = gallery.same_id(ql[s:e])
        good = same_valid & (gallery.cam[same_idx] != qc[s:e, None])
        chunk_labels = ql[s:e]
        ranks, valid = good_match_ranks(qf[s:e] @ gallery.f.T, same_idx, good,
                                        lambda r, c: gallery.label[c] == chunk_labels[r])
        n_good = valid.sum(1)
        has_match.append(n_good > 0)
        first_hit.append(torch.where(n_good > 0, ranks[:, 0], INT64_MAX))
        ap.append(average_precision(ranks, valid, protocol))
        last = ranks.gather(1, (n_good - 1).clamp(min=0)[:, None]).squeeze(1)
        inp.append(torch.where(n_good > 0, n_good.double() / (last + 1).double(), 0.0))
    first_hit, ap, inp, has_match = (torch.cat(x).cpu() for x in (first_hit, ap, inp, has_match))
    n_valid = int(has_match.sum())
    denominator = n_query if protocol == "reference" else max(n_valid, 1)
    # CMC as the reference computes it: integer counts divided in float32
    cmc = {n: float(torch.tensor(float((first_hit < n).sum()), dtype=torch.float32) / denominator)
           for n in (1, 5, 10)}
    result = {"rank1": cmc[1], "rank5": cmc[5], "rank10": cmc[10],
              "mAP": float(ap.sum()) / denominator, "num_query": n_query, "num_valid": n_valid}
    if protocol == "standard":
        result["mINP"] = float(inp.sum()) / denominator
    return result


def format_result(result: dict, protocol: str = "reference") -> str:
    line = "Rank@1_%f_Rank@5_%f_Rank@10_%f_mAP_%f" % (result["rank1"], result["rank5"], result["rank10"],
                                                      result["mAP"])
    return line + ("_mINP_%f" % result["mINP"] if protocol == "standard" else "")


def multi_query_features(query_label, query_cam, mquery_f, mquery_label, mquery_cam, query_f) -> torch.Tensor:
    """Each query's feature replaced by the mean of the multi-query images of its id and camera.

    A query whose (id, camera) has no multi-query image keeps its own feature.
    """
    ql, qc = (torch.as_tensor(np.asarray(x).reshape(-1), dtype=torch.int64) for x in (query_label, query_cam))
    ml, mc = (torch.as_tensor(np.asarray(x).reshape(-1), dtype=torch.int64) for x in (mquery_label, mquery_cam))
    mf = torch.as_tensor(np.asarray(mquery_f), dtype=torch.float32)
    groups, inverse = torch.unique(ml * 1000 + mc, return_inverse=True)
    sums = torch.zeros(len(groups), mf.shape[1]).index_add_(0, inverse, mf)
    means = sums / torch.bincount(inverse, minlength=len(groups))[:, None]
    qkey = ql * 1000 + qc
    pos = torch.searchsorted(groups, qkey).clamp(max=len(groups) - 1)
    found = groups[pos] == qkey
    own = torch.as_tensor(np.asarray(query_f), dtype=torch.float32)
    return torch.where(found[:, None], means[pos], own)


def load_mat(path: str | os.PathLike, keys) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path} does not exist (run test.py first)")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:
        raise EvaluationError(f"cannot read {path}: {e}") from None
    missing = [k for k in keys if k not in mat]
    if missing:
        raise EvaluationError(f"{path} lacks the keys {', '.join(missing)}")
    return mat


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Rank-k / mAP (/ mINP) of the features test.py wrote.")
    p.add_argument("--mat", default="pytorch_result.mat", help="features from test.py")
    p.add_argument("--multi_mat", default=None,
                   help="multi-query features from test.py --multi, evaluated too when the file exists "
                        "(default: multi_query.mat beside --mat)")
    p.add_argument("--protocol", choices=["reference", "standard"], default="reference",
                   help="reference: trapezoid AP, divide by all queries; standard: AP and mINP over valid queries")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    return p


def main(args: argparse.Namespace) -> dict:
    mat = load_mat(args.mat, RESULT_KEYS)
    q = (mat["query_f"], mat["query_label"], mat["query_cam"])
    g = (mat["gallery_f"], mat["gallery_label"], mat["gallery_cam"])
    result = evaluate(*q, *g, protocol=args.protocol, device=args.device)
    print(format_result(result, args.protocol))
    multi_file = Path(args.multi_mat or Path(args.mat).with_name("multi_query.mat"))
    if multi_file.is_file() and multi_file.stat().st_mtime < Path(args.mat).stat().st_mtime:
        print(f"note: ignoring {multi_file}, older than {args.mat} (written by an earlier test.py --multi run)")
    elif multi_file.is_file():
        m = load_mat(args.multi_mat, ("mquery_f", "mquery_label", "mquery_cam"))
        mq = multi_query_features(q[1], q[2], m["mquery_f"], m["mquery_label"], m["mquery_cam"], q[0])
        multi = evaluate(mq, q[1], q[2], *g, protocol=args.protocol, device=args.device)
        print("multi Rank@1:%f Rank@5:%f Rank@10:%f mAP:%f" % (multi["rank1"], multi["rank5"], multi["rank10"],
                                                                multi["mAP"]))
        result["multi"] = multi
    if args.json:  # both protocols, so collected tables need no recomputation
        other = "standard" if args.protocol == "reference" else "reference"
        result[other] = evaluate(*q, *g, protocol=other, device=args.device)
        result["protocol"] = args.protocol
        import json
        from utils import write_text_atomic
        write_text_atomic(json.dumps(result, indent=2), args.json)
    return result


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
