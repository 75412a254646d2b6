"""A straightforward per-query evaluation in the style of the reference evaluate_gpu.py (the baseline
the benchmark and the tests compare against). Ties: reverse of a stable ascending argsort."""
import numpy as np


def naive_query(score, ql, qc, gl, gc, protocol="reference"):
    """(AP, first-hit rank or None, INP) of one query from its gallery scores."""
    index = np.argsort(score, kind="stable")[::-1]
    good = np.flatnonzero((gl == ql) & (gc != qc) & (gl != -1))
    junk = np.flatnonzero((gl == -1) | ((gl == ql) & (gc == qc)))
    if good.size == 0:
        return 0.0, None, 0.0
    index = index[~np.isin(index, junk)]
    rows_good = np.flatnonzero(np.isin(index, good))
    ap = 0.0
    for i, r in enumerate(rows_good):
        precision = (i + 1) / (r + 1)
        if protocol == "reference":
            old = i / r if r != 0 else 1.0
            ap += (1.0 / len(good)) * (old + precision) / 2
        else:
            ap += precision / len(good)
    return ap, rows_good[0], len(good) / (rows_good[-1] + 1)


def naive_evaluate(qf, ql, qc, gf, gl, gc, protocol="reference"):
    aps, firsts, inps = [], [], []
    for i in range(len(qf)):
        score = gf @ qf[i]
        ap, first, inp = naive_query(score, ql[i], qc[i], gl, gc, protocol)
        aps.append(ap), firsts.append(first), inps.append(inp)
    valid = [f is not None for f in firsts]
    n = len(qf) if protocol == "reference" else max(sum(valid), 1)
    out = {f"rank{k}": sum(f is not None and f < k for f in firsts) / n for k in (1, 5, 10)}
    out["mAP"] = sum(aps) / n
    if protocol == "standard":
        out["mINP"] = sum(inps) / n
    return out
