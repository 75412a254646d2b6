"""k-reciprocal re-ranking as the reference implementations compute it: dense (query + gallery)^2 arrays and
per-image loops (layumi's re_ranking.py and TransReID's utils/reranking.py, in float32). The baseline of
benchmarks/bench_rerank.py and the independent transcription the tests compare against.

Neighbour lists use a stable argsort (equal distances: lower index first), the rule the toolkit follows."""
import numpy as np


def naive_base_distance(qf, gf, variant="layumi"):
    feats = np.concatenate([qf, gf]).astype(np.float32)
    s = feats @ feats.T
    if variant == "layumi":
        d = np.power(2.0 - 2 * s, 2).astype(np.float32)
    else:
        sq = (feats * feats).sum(1)
        d = (sq[:, None] + sq[None, :]) - 2 * s
    return (d / np.max(d, axis=1, keepdims=True)).astype(np.float32)


def k_reciprocal(initial_rank, i, k):
    forward = initial_rank[i, :k + 1]
    backward = initial_rank[forward, :k + 1]
    return forward[np.where(backward == i)[0]]


def naive_rerank(qf, gf, k1=20, k2=6, lambda_value=0.3, variant="layumi", partition=False):
    """(Q, G) final distances, float32. partition: neighbour lists by argpartition as layumi's code takes
    them (quicker; equal distances then come in any order)."""
    dist = naive_base_distance(qf, gf, variant)
    n, n_query = dist.shape[0], len(qf)
    initial_rank = (np.argpartition(dist, range(1, k1 + 1)) if partition else
                    np.argsort(dist, axis=1, kind="stable"))
    v = np.zeros_like(dist, dtype=np.float32)
    for i in range(n):
        near = k_reciprocal(initial_rank, i, k1)
        expansion = near
        for c in near:
            cand = k_reciprocal(initial_rank, c, int(np.around(k1 / 2)))
            if len(np.intersect1d(cand, near)) > 2.0 / 3.0 * len(cand):
                expansion = np.append(expansion, cand)
        expansion = np.unique(expansion)
        weight = np.exp(-dist[i, expansion])
        v[i, expansion] = weight / np.sum(weight)
    if k2 != 1:
        v_qe = np.zeros_like(v)
        for i in range(n):
            v_qe[i] = np.mean(v[initial_rank[i, :k2]], axis=0)
        v = v_qe
    inv_index = [np.where(v[:, t] != 0)[0] for t in range(n)]
    jaccard = np.zeros((n_query, n), np.float32)
    for i in range(n_query):
        temp_min = np.zeros(n, np.float32)
        for t in np.where(v[i] != 0)[0]:
            rows = inv_index[t]
            temp_min[rows] = temp_min[rows] + np.minimum(v[i, t], v[rows, t])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    final = jaccard * (1 - lambda_value) + dist[:n_query] * lambda_value
    return final[:, n_query:]
