"""Evaluation speed and memory: `python evaluate_gpu.py` as a user runs it (process start to exit, peak
RSS) against a straightforward per-query loop, both timed in the same run.

    python benchmarks/bench_eval.py            # Market size, then MSMT17 size
    python benchmarks/bench_eval.py --quick    # Market size only

Random unit features with junk (-1), distractors (0) and queries that have no good match, written to a
pytorch_result.mat as test.py writes it. The per-query loop is timed on a subset of queries and scaled
to all of them (it is linear in queries); the two are checked to agree on that subset.
"""
import argparse
import os
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
from naive_eval import naive_evaluate  # noqa: E402

from evaluate_gpu import evaluate  # noqa: E402

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


def run_command(args: list[str], cwd: str) -> tuple[float, float, str]:
    """(seconds from process start to exit, the process's peak RSS in GB, its stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"evaluate_gpu.py failed with exit code {proc.returncode}")
    return seconds, usage.ru_maxrss / 1024 ** 2, out


def bench(size: str, naive_queries: int, repeats: int) -> None:
    qf, ql, qc, gf, gl, gc = make_set(*SIZES[size])
    with tempfile.TemporaryDirectory() as tmp:
        scipy.io.savemat(Path(tmp) / "pytorch_result.mat", {"query_f": qf, "query_label": ql, "query_cam": qc,
                                                           "gallery_f": gf, "gallery_label": gl, "gallery_cam": gc})
        runs = [run_command([sys.executable, str(ROOT / "evaluate_gpu.py")], tmp) for _ in range(repeats)]
    t_cmd = statistics.median(r[0] for r in runs)
    peak = max(r[1] for r in runs)
    sub = slice(0, naive_queries)
    t0 = time.perf_counter()
    naive = naive_evaluate(qf[sub], ql[sub], qc[sub], gf, gl, gc, "reference")
    t_naive = (time.perf_counter() - t0) * len(qf) / naive_queries
    check = evaluate(qf[sub], ql[sub], qc[sub], gf, gl, gc, "reference")
    assert all(abs(check[k] - naive[k]) < 1e-6 for k in naive), (check, naive)  # CMC is float32
    t0 = time.perf_counter()  # the floor of any exact method: every score, one float32 GEMM
    for s in range(0, len(qf), 1024):
        qf[s:s + 1024] @ gf.T
    t_gemm = time.perf_counter() - t0
    gflops = 2 * qf.shape[0] * gf.shape[0] * qf.shape[1] / t_gemm / 1e9
    print(f"{size}: {len(qf)} x {len(gf)}: `python evaluate_gpu.py` {t_cmd:.2f} s whole process "
          f"(median of {repeats}: {', '.join(f'{r[0]:.2f}' for r in runs)}), peak RSS {peak:.2f} GB; "
          f"per-query loop {t_naive:.1f} s (timed on {naive_queries} queries) -> {t_naive / t_cmd:.1f}x faster; "
          f"the score GEMM alone {t_gemm:.2f} s ({gflops:.0f} GFLOP/s), i.e. {t_cmd / t_gemm:.2f}x the GEMM; "
          f"{runs[0][2].strip()}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--naive_queries", type=int, default=300, help="queries timed with the per-query loop")
    p.add_argument("--repeats", type=int, default=3, help="runs of the whole command per size (median)")
    p.add_argument("--quick", action="store_true", help="Market size only")
    args = p.parse_args()
    bench("market", args.naive_queries, args.repeats)
    if not args.quick:
        bench("msmt", max(args.naive_queries // 6, 10), 1)  # one run: about half a minute each


if __name__ == "__main__":
    main()
