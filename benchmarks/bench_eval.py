"""Evaluation speed and memory: evaluate_gpu.evaluate against a straightforward per-query loop.

    python benchmarks/bench_eval.py            # Market size, then MSMT size in a subprocess (peak RSS)
    python benchmarks/bench_eval.py --quick    # smaller sizes

Random unit features with junk (-1), distractors (0) and queries that have no good match.
The per-query loop is timed on a subset of queries and scaled to all of them (it is linear in queries).
"""
import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.io

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_gpu import evaluate  # noqa: E402
from naive_eval import naive_evaluate  # noqa: E402

SIZES = {"market": (3368, 19732, 751, 6), "msmt": (11659, 82161, 3060, 15)}


def make_set(n_query, n_gallery, n_ids, n_cams, dim=512, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, n_ids + 1, n_gallery)
    centers = rng.normal(size=(n_ids + 1, dim)).astype(np.float32)
    gl = ids.copy()
    gl[rng.random(n_gallery) < 0.1] = -1  # junk
    gl[rng.random(n_gallery) < 0.1] = 0  # distractors
    gf = centers[ids] + 1.5 * rng.normal(size=(n_gallery, dim)).astype(np.float32)
    ql = rng.integers(1, n_ids + 1, n_query)
    ql[: n_query // 50] = n_ids + 5  # no good match at all
    qf = centers[np.minimum(ql, n_ids)] + 1.5 * rng.normal(size=(n_query, dim)).astype(np.float32)
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return norm(qf), ql, rng.integers(1, n_cams + 1, n_query), norm(gf), gl, rng.integers(1, n_cams + 1, n_gallery)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def bench(size: str, naive_queries: int, repeats: int) -> None:
    qf, ql, qc, gf, gl, gc = make_set(*SIZES[size])
    evaluate(qf[:64], ql[:64], qc[:64], gf, gl, gc, "reference", device="cpu")  # warm-up (thread pool, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours = evaluate(qf, ql, qc, gf, gl, gc, "reference", device="cpu")
        times.append(time.perf_counter() - t0)
    t_ours = statistics.median(times)
    line = f"{size}: {len(qf)} x {len(gf)}: ours {t_ours:.2f} s (median of {repeats}, mAP {ours['mAP']:.4f})"
    if naive_queries:
        sub = slice(0, naive_queries)
        t0 = time.perf_counter()
        naive = naive_evaluate(qf[sub], ql[sub], qc[sub], gf, gl, gc, "reference")
        t_naive = (time.perf_counter() - t0) * len(qf) / naive_queries
        check = evaluate(qf[sub], ql[sub], qc[sub], gf, gl, gc, "reference", device="cpu")
        assert abs(check["mAP"] - naive["mAP"]) < 1e-6, (check, naive)
        line += f", per-query loop {t_naive:.1f} s (from {naive_queries} queries) -> {t_naive / t_ours:.1f}x faster"
    print(line + f", peak RSS {peak_rss_gb():.2f} GB", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(SIZES), default=None, help="run one size only (used for MSMT's RSS)")
    p.add_argument("--naive_queries", type=int, default=300, help="queries timed with the per-query loop")
    p.add_argument("--quick", action="store_true", help="Market size only")
    args = p.parse_args()
    if args.size:
        bench(args.size, args.naive_queries, 3 if args.size == "market" else 1)
        return
    subprocess.run([sys.executable, __file__, "--size", "market", "--naive_queries", str(args.naive_queries)],
                   check=True)
    with tempfile.TemporaryDirectory() as tmp:  # the script as a user runs it, python start-up included
        qf, ql, qc, gf, gl, gc = make_set(*SIZES["market"])
        mat = Path(tmp) / "pytorch_result.mat"
        scipy.io.savemat(mat, {"query_f": qf, "query_label": ql, "query_cam": qc, "gallery_f": gf,
                               "gallery_label": gl, "gallery_cam": gc})
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "evaluate_gpu.py"), "--mat", str(mat), "--device", "cpu"],
                       check=True, cwd=tmp)
        print(f"market: python evaluate_gpu.py, whole process {time.perf_counter() - t0:.2f} s")
    if not args.quick:  # own process, so its peak RSS is its own
        subprocess.run([sys.executable, __file__, "--size", "msmt", "--naive_queries", "50"], check=True)


if __name__ == "__main__":
    main()
