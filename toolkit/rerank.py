"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), exact and in bounded memory. NumPy and SciPy only.

The references (layumi's re_ranking.py, TransReID's utils/reranking.py) hold several dense
(query + gallery)^2 arrays at once. Nothing here is N x N:
- the base distances come from score products in square tiles on and above the diagonal (the matrix is
  symmetric), each read along its rows and its columns; they leave every image's row maximum and its
  nearest (distance, index) pairs, and the query x gallery block when it is small enough to keep;
- the k-reciprocal sets, their expansion and the encoding V are (N, tens) arrays and sparse matrices;
- the Jaccard numerators of a chunk of queries come from V's inverted index (its columns), and the final
  distances are made, ranked and dropped one query chunk at a time.

Variants: "layumi" D = (2 - 2 q.g)^2 (L2-normalised features), "transreid" D = |q|^2 + |g|^2 - 2 q.g;
both divided by their row maximum. Neighbour lists are ordered by (D, index): on exactly equal distances
the lower index comes first (the references leave that order to argpartition / argsort). Everything is
float32 as in layumi's code; TransReID keeps V in float16, a shortcut not copied here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from toolkit.ranking import (
    EvaluationError,
    GalleryIndex,
    block_score_function,
    check_inputs,
    query_results,
    score_function,
    summarize,
)

RERANK_CHUNK_ELEMENTS = 1 << 23  # 32 MB per float32 chunk array; several of them live at once
QUERY_CACHE_BYTES = 512 << 20  # the query x gallery base distances are kept from the first pass up to this size
VARIANTS = ("layumi", "transreid")
NEAREST_MARGIN = 4  # pairs kept beyond the k1 + 1 nearest, so that the order by D can be checked


@dataclass(frozen=True)
class RerankParams:
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    variant: str = "layumi"

    def check(self, n_images: int) -> None:
        if self.variant not in VARIANTS:
            raise EvaluationError(f"unknown re-ranking variant {self.variant!r} (expected one of {VARIANTS})")
        if self.k1 < 1 or self.k2 < 1:
            raise EvaluationError(f"re-ranking needs k1 >= 1 and k2 >= 1, got k1 {self.k1}, k2 {self.k2}")
        if self.k2 > self.k1 + 1:
            raise EvaluationError(f"k2 ({self.k2}) must be at most k1 + 1 ({self.k1 + 1}): query expansion "
                                  "averages the first k2 of the k1 + 1 nearest images")
        if not 0.0 <= self.lambda_value <= 1.0:
            raise EvaluationError(f"lambda must be in [0, 1], got {self.lambda_value}")
        if n_images <= self.k1:
            raise EvaluationError(f"re-ranking with k1 {self.k1} needs more than {self.k1} query + gallery "
                                  f"images, there are {n_images}")


# what TransReID's R1_mAP_eval passes when TEST.RE_RANKING is on (not the paper's 20 / 6)
TRANSREID_PARAMS = RerankParams(k1=50, k2=15, lambda_value=0.3, variant="transreid")


def half_k(k1: int) -> int:
    """round(k1 / 2) as numpy's around does it (halves to even): 20 -> 10, 5 -> 2, 3 -> 2."""
    return int(np.around(k1 / 2))


def base_distance(scores: np.ndarray, sq_rows: np.ndarray | None, sq_cols: np.ndarray | None,
                  variant: str) -> np.ndarray:
    """The variant's distance from dot products, float32, computed in place of `scores`.

    layumi: (2 - 2 s)^2; transreid: (|a|^2 + |b|^2) - 2 s, with sq_rows / sq_cols broadcasting to scores."""
    d = np.asarray(scores, np.float32)
    d *= np.float32(-2.0)
    if variant == "layumi":
        d += np.float32(2.0)
        np.square(d, out=d)
    else:
        d += sq_rows + sq_cols
    return d


def top_neighbours(d: np.ndarray, k: int) -> np.ndarray:
    """Each row's k + 1 smallest entries by (value, column), as columns in that order (a full stable sort)."""
    return np.argsort(d, axis=1, kind="stable")[:, :k + 1]


def sparse_nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the True entries of a C-contiguous 2-d bool array that is mostly False, quicker than
    np.nonzero: 8 entries are tested at once as one 64-bit word, and only the words holding a True are
    unpacked."""
    n_cols = mask.shape[1]
    flat = mask.reshape(-1)
    whole = len(flat) // 8 * 8
    words = np.flatnonzero(flat[:whole].view(np.uint64))
    byte_row, byte_col = np.nonzero(flat[:whole].reshape(-1, 8)[words])
    index = np.concatenate([words[byte_row] * 8 + byte_col, whole + np.flatnonzero(flat[whole:])])
    return np.divmod(index, n_cols)


def float_order(x: np.ndarray) -> np.ndarray:
    """uint64 codes of float32 values that sort as the values do (-0.0 just below +0.0)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return np.where(u >> np.uint64(31), ~u & np.uint64(0xFFFFFFFF), u | np.uint64(0x80000000))


def float_from_order(code: np.ndarray) -> np.ndarray:
    code = code.astype(np.uint64)
    u = np.where(code >> np.uint64(31), code & np.uint64(0x7FFFFFFF), ~code & np.uint64(0xFFFFFFFF))
    return u.astype(np.uint32).view(np.float32)


class RunningNearest:
    """Per row, the `keep` smallest (distance, column) pairs and the largest distance over the blocks of
    columns given so far. A block's entries above a row's current keep-th distance are never gathered."""

    def __init__(self, n: int, keep: int):
        self.keep = keep
        self.d = np.full((n, keep), np.inf, np.float32)
        self.col = np.full((n, keep), n, np.int64)
        self.max = np.full(n, -np.inf, np.float32)
        self.col_bits = n.bit_length()

    def add(self, start: int, d: np.ndarray, col0: int, transposed: bool = False) -> None:
        """Rows start.. of the distances to columns col0..: d[row, col], or d[col, row] when transposed
        (the other side of a symmetric block, without a transposed copy)."""
        axis = 0 if transposed else 1
        n_rows, width = d.shape[1 - axis], d.shape[axis]
        rows = slice(start, start + n_rows)
        np.maximum(self.max[rows], d.max(axis), out=self.max[rows])
        bound = self.d[rows, -1].copy()
        fresh = np.flatnonzero(np.isinf(bound))
        if len(fresh) and width > 4 * self.keep:  # a column sample's keep-th smallest bounds the row's own
            step = min(8, width // (2 * self.keep))
            sample = d[::step][:, fresh] if transposed else d[fresh, ::step]
            bound[fresh] = np.partition(sample, self.keep - 1, axis=axis).take(self.keep - 1, axis=axis)
        mask = d <= (bound[None, :] if transposed else bound[:, None])
        a, b = sparse_nonzero(mask)
        if not len(a):
            return
        r, c = (b, a) if transposed else (a, b)
        touched = np.flatnonzero(np.bincount(r, minlength=n_rows))
        new_d = d[a, b]
        old_rows = np.repeat(touched, self.keep)
        self._merge(start, touched, np.concatenate([old_rows, r]),
                    np.concatenate([self.d[start + touched].reshape(-1), new_d]),
                    np.concatenate([self.col[start + touched].reshape(-1), c + col0]))

    def _merge(self, start: int, touched: np.ndarray, rows: np.ndarray, d: np.ndarray, cols: np.ndarray) -> None:
        """Keep each touched row's `keep` smallest (d, col) pairs: one sort of packed (row, d, col) keys."""
        row_bits = int(touched[-1]).bit_length()
        if row_bits + 32 + self.col_bits <= 63:
            keys = np.sort((rows.astype(np.uint64) << np.uint64(32 + self.col_bits))
                           | (float_order(d) << np.uint64(self.col_bits)) | cols.astype(np.uint64))
            first = np.searchsorted(keys >> np.uint64(32 + self.col_bits), touched.astype(np.uint64))
            kept = keys[first[:, None] + np.arange(self.keep)]
            mask = np.uint64((1 << self.col_bits) - 1)
            self.col[start + touched] = (kept & mask).astype(np.int64)
            self.d[start + touched] = float_from_order((kept >> np.uint64(self.col_bits)) & np.uint64(0xFFFFFFFF))
            return
        order = np.lexsort((cols, d, rows))
        first = np.searchsorted(rows[order], touched)
        take = order[first[:, None] + np.arange(self.keep)]
        self.d[start + touched], self.col[start + touched] = d[take], cols[take]


def reciprocal_mask(ranked: np.ndarray, k: int, chunk_rows: int) -> np.ndarray:
    """(N, k + 1) bool: whether ranked[i, p] (p <= k) has i among its own k + 1 nearest."""
    n = len(ranked)
    head = ranked[:, :k + 1]
    out = np.empty((n, k + 1), bool)
    for s in range(0, n, chunk_rows):
        e = min(s + chunk_rows, n)
        back = head[head[s:e]]  # (rows, k + 1, k + 1)
        out[s:e] = (back == np.arange(s, e)[:, None, None]).any(2)
    return out


class KReciprocal:
    """The re-ranked distances of queries to gallery images (queries first, then gallery = all N)."""

    def __init__(self, qf: np.ndarray, gf: np.ndarray, params: RerankParams, device: str = "cpu",
                 chunk_elements: int = RERANK_CHUNK_ELEMENTS, progress: bool | None = None):
        params.check(len(qf) + len(gf))
        self.params, self.n_query, self.chunk_elements = params, len(qf), chunk_elements
        self.progress = progress
        self.features = np.ascontiguousarray(np.concatenate([qf, gf]), np.float32)
        self.sq = (self.features * self.features).sum(1) if params.variant == "transreid" else None
        self.gallery_f = self.features[self.n_query:]
        self.row_max, self.ranked = self._neighbours(device)
        v = self._encoding()
        if params.k2 != 1:
            v = self._query_expansion(v)
        self.v = v
        self.gallery_terms = v[self.n_query:].tocsc()
        self.gallery_terms.sort_indices()
        # only needed when the first pass could not keep the query x gallery distances
        self.query_scores = None if self.query_d is not None else \
            score_function(self.features[:self.n_query], self.gallery_f, device)

    def _bar(self, iterable, total: int, desc: str):
        return tqdm(iterable, total=total, desc=desc, leave=False, mininterval=1.0,
                    disable=(total < 4) if self.progress is None else not self.progress)

    def _distance(self, scores: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
        """Base distances of a block of score products: rows x cols of all N images."""
        sq = self.sq
        return base_distance(scores, None if sq is None else sq[rows][:, None],
                             None if sq is None else sq[cols][None, :], self.params.variant)

    def _neighbours(self, device: str) -> tuple[np.ndarray, np.ndarray]:
        """Row maxima of the base distance and every image's k1 + 1 nearest images by (D, index).

        The score matrix is symmetric, so it is made in square tiles above the diagonal, each used for its
        rows and (transposed) for its columns: half the products of row-by-row chunks."""
        n, k1 = len(self.features), self.params.k1
        near = RunningNearest(n, min(n, k1 + 1 + NEAREST_MARGIN))
        products = block_score_function(self.features, self.features, device)
        side = max(1, math.isqrt(self.chunk_elements))
        blocks = [(s, min(s + side, n)) for s in range(0, n, side)]
        q = self.n_query
        cache = 4 * q * (n - q) <= QUERY_CACHE_BYTES
        self.query_d = np.empty((q, n - q), np.float32) if cache else None
        pairs = [(a, b) for i, a in enumerate(blocks) for b in blocks[i:]]
        for (s, e), (s2, e2) in self._bar(pairs, len(pairs), "re-ranking: neighbours"):
            d = self._distance(products(slice(s, e), slice(s2, e2)), slice(s, e), slice(s2, e2))
            near.add(s, d, s2)
            if s2 != s:
                near.add(s2, d, s, transposed=True)
            if cache:
                self._cache_query_block(d, s, e, s2, e2)
        m = near.max
        if not (np.isfinite(m).all() and (m > 0).all()):
            raise EvaluationError("re-ranking: an image is at distance 0 from every image (all features equal?); "
                                  "its distances cannot be normalised")
        self.near_d, self.near_col = near.d, near.col
        return m, self._ranked(near, products)

    def _cache_query_block(self, d: np.ndarray, s: int, e: int, s2: int, e2: int) -> None:
        """The query x gallery part of a tile (rows s..e, columns s2..e2). Tiles lie on or above the diagonal and
        queries come first, so every (query, gallery) pair is in the upper part of one tile."""
        q = self.n_query
        if s < q and e2 > q:
            r1, c0 = min(e, q), max(s2, q)
            self.query_d[s:r1, c0 - q:e2 - q] = d[:r1 - s, c0 - s2:]

    def _ranked(self, near: RunningNearest, products) -> np.ndarray:
        """The k1 + 1 nearest by (D, index) from the kept (d, index) pairs. D = d / row max can make unequal
        distances equal; where that may reach past the kept pairs, the row is ranked from all its distances."""
        k1, n = self.params.k1, len(self.features)
        dn = near.d / near.max[:, None]
        order = np.lexsort((near.col, dn), axis=1)
        ranked = np.take_along_axis(near.col, order, 1)[:, :k1 + 1]
        boundary = np.take_along_axis(dn, order[:, k1:k1 + 1], 1)[:, 0]
        unsafe = np.flatnonzero((near.keep < n) & ~(dn[:, -1] > boundary))
        for i in unsafe:
            row = self._distance(products(slice(i, i + 1), slice(None)), slice(i, i + 1), slice(None))[0]
            ranked[i] = top_neighbours((row / near.max[i])[None, :], k1)[0]
        return ranked

    def pair_distances(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """D[rows[i], cols[i]] for index pairs, float32: from the neighbour pass where it kept the pair,
        else from the features' dot product."""
        out = np.empty(len(rows), np.float32)
        hit = self.near_col[rows] == cols[:, None]
        found = hit.any(1)
        out[found] = self.near_d[rows[found], hit[found].argmax(1)]
        missing = np.flatnonzero(~found)
        step = max(1, self.chunk_elements // self.features.shape[1])
        for s in range(0, len(missing), step):
            idx = missing[s:s + step]
            r, c = rows[idx], cols[idx]
            dots = np.einsum("ij,ij->i", self.features[r], self.features[c])
            sq = self.sq
            out[idx] = base_distance(dots, None if sq is None else sq[r], None if sq is None else sq[c],
                                     self.params.variant)
        return out / self.row_max[rows]

    def _encoding(self) -> sp.csr_matrix:
        """V: row i holds exp(-D[i, j]) divided by its sum over j in the expanded k-reciprocal set of i."""
        n, k1 = len(self.features), self.params.k1
        kh = half_k(k1)
        ranked = self.ranked
        mask_chunk = max(1, self.chunk_elements // (4 * (k1 + 1) ** 2))
        near = reciprocal_mask(ranked, k1, mask_chunk)  # K(i, k1) within ranked[i]
        half = reciprocal_mask(ranked, kh, mask_chunk)  # K(c, kh) within ranked[c, :kh + 1]
        keys = []
        rows_per = max(1, self.chunk_elements // (4 * (k1 + 1) ** 2 * (kh + 1)))
        starts = range(0, n, rows_per)
        for s in self._bar(starts, len(starts), "re-ranking: expansion"):
            e = min(s + rows_per, n)
            own, own_in = ranked[s:e], near[s:e]  # (b, k1 + 1)
            cand = ranked[own, :kh + 1]  # (b, k1 + 1, kh + 1): R(c, kh) of every c in R(i, k1)
            cand_in = half[own]  # which of them are in K(c, kh)
            in_own = ((cand[..., None] == own[:, None, None, :]) & own_in[:, None, None, :]).any(3)
            size = cand_in.sum(2)
            accept = own_in & ((in_own & cand_in).sum(2) > 2.0 / 3.0 * size)
            row_ids = np.arange(s, e, dtype=np.int64)
            keys.append(row_ids[:, None].repeat(k1 + 1, 1)[own_in] * n + own[own_in])
            take = accept[..., None] & cand_in
            keys.append(np.broadcast_to(row_ids[:, None, None], cand.shape)[take] * n + cand[take])
        keys = np.sort(np.concatenate(keys))
        rows, cols = np.divmod(keys[np.concatenate([[True], keys[1:] != keys[:-1]])], n)
        weights = np.exp(-self.pair_distances(rows, cols))
        counts = np.bincount(rows, minlength=n)
        indptr = np.concatenate([[0], np.cumsum(counts)])
        present = counts > 0
        sums = np.zeros(n, np.float32)
        sums[present] = np.add.reduceat(weights, indptr[:-1][present])
        data = weights / sums[rows]
        return sp.csr_matrix((data.astype(np.float32), cols, indptr), shape=(n, n))

    def _query_expansion(self, v: sp.csr_matrix) -> sp.csr_matrix:
        """V'[i] = mean of V over the first k2 of i's nearest images, summed nearest first as the reference does."""
        n, k2 = v.shape[0], self.params.k2
        cols = self.ranked[:, :k2].reshape(-1)
        average = sp.csr_matrix((np.ones(len(cols), np.float32), cols, np.arange(0, n * k2 + 1, k2)),
                                shape=(n, n))
        out = (average @ v).tocsr()
        out.data /= np.float32(k2)
        out.sort_indices()
        return out

    def overlaps(self, s: int, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query, gallery image, m) for every pair of queries s..e and gallery images that share a term of V:
        m = sum over shared t of min(V[q, t], V[g, t]), summed in float32 in ascending t as the reference adds
        them. Pairs that share nothing (m = 0) are not listed. Found through the inverted index (V's columns)."""
        g = self.gallery_terms  # CSC: column t lists the gallery images whose V has term t
        n_gallery = g.shape[0]
        q = self.v[s:e]
        q_rows = np.repeat(np.arange(e - s), np.diff(q.indptr))
        terms, a = q.indices, q.data
        lengths = g.indptr[terms + 1] - g.indptr[terms]
        starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]
        which = np.repeat(np.arange(len(terms)), lengths)  # one entry per (query term, gallery image)
        pos = g.indptr[terms[which]] + (np.arange(len(which)) - starts[which])
        keys = q_rows[which] * n_gallery + g.indices[pos]
        order = np.argsort(keys, kind="stable")  # stable: each pair's terms stay in ascending t
        keys = keys[order]
        first = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]])) if len(keys) else keys
        m = np.add.reduceat(np.minimum(a[which], g.data[pos])[order], first) if len(keys) else \
            np.zeros(0, np.float32)
        pair_q, pair_g = np.divmod(keys[first], n_gallery)
        return pair_q, pair_g, m.astype(np.float32)

    def final_distances(self, s: int, e: int) -> np.ndarray:
        """(1 - lambda) jaccard + lambda D for queries s..e against the whole gallery, float32, with
        jaccard = 1 - m / (2 - m): exactly 1 where a pair shares no term."""
        lam = self.params.lambda_value
        if self.query_d is not None:
            d = self.query_d[s:e] / self.row_max[s:e, None]
        else:
            d = self._distance(self.query_scores(s, e), slice(s, e), slice(self.n_query, None))
            d /= self.row_max[s:e, None]
        pair_q, pair_g, m = self.overlaps(s, e)
        jaccard = np.float32(1.0) - m / (np.float32(2.0) - m)
        near = jaccard * (1 - lam) + d[pair_q, pair_g] * lam
        d *= lam
        d += np.float32(1.0) * (1 - lam)  # jaccard 1: the same float32 operations as for the pairs above
        d[pair_q, pair_g] = near
        return d

    def chunk_rows(self) -> int:
        return max(1, self.chunk_elements // max(len(self.gallery_f), 1))


def rerank_query_results(query_f, query_label, query_cam, gallery_f, gallery_label, gallery_cam,
                         params: RerankParams = RerankParams(), device: str | None = None,
                         chunk_elements: int = RERANK_CHUNK_ELEMENTS,
                         progress: bool | None = None) -> tuple[dict[str, np.ndarray], KReciprocal]:
    """Per-query results (see toolkit.ranking.query_results) of the re-ranked distances: gallery items in
    ascending final distance, equal distances with the lower gallery index first; and the re-ranker."""
    qf, ql, qc, gf, gl, gc = check_inputs(query_f, query_label, query_cam, gallery_f, gallery_label, gallery_cam)
    reranker = KReciprocal(qf, gf, params, str(device or "cpu"), chunk_elements, progress)
    gallery = GalleryIndex(gf, gl, gc)
    keep = gallery.keep
    per_query = query_results(qf, ql, qc, gallery, lambda s, e: -reranker.final_distances(s, e)[:, keep],
                              reranker.chunk_rows(), lower_index_first=True)
    return per_query, reranker


def evaluate_reranked(query_f, query_label, query_cam, gallery_f, gallery_label, gallery_cam,
                      params: RerankParams = RerankParams(), device: str | None = None,
                      chunk_elements: int = RERANK_CHUNK_ELEMENTS, progress: bool | None = None) -> dict[str, dict]:
    """{"reference": metrics, "standard": metrics} after k-reciprocal re-ranking."""
    per_query, _ = rerank_query_results(query_f, query_label, query_cam, gallery_f, gallery_label, gallery_cam,
                                        params, device, chunk_elements, progress)
    return summarize(per_query)
