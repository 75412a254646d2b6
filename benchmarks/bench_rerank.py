"""k-reciprocal re-ranking at Market-1501 and MSMT17 size: the toolkit against the dense reference algorithm.

    python benchmarks/bench_rerank.py                 # Market size: ours and the dense reference; MSMT size: ours
    python benchmarks/bench_rerank.py --sizes market  # one size only
    python benchmarks/bench_rerank.py --no_reference  # skip the dense reference (minutes and ~14 GB at Market size)

Each measurement runs in its own process, so its peak resident memory is its own. Features are synthetic,
512-d, L2-normalised, clustered by identity like a trained model's (about 26 images per id), with junk.
Both implementations run the whole re-ranked evaluation (layumi's variant, k1 20, k2 6, lambda 0.3).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

SIZES = {"market": (3368, 19732, 751), "msmt": (11659, 82161, 3060)}  # queries, gallery, test ids


def features(n_query: int, n_gallery: int, ids: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids + 1, 512)).astype(np.float32)
    gl = rng.integers(0, ids, n_gallery)
    gl[rng.random(n_gallery) < 0.03] = -1  # junk
    ql = rng.integers(1, ids, n_query)

    def make(labels):
        f = centres[labels.clip(min=0)] + np.float32(2.2) * rng.standard_normal((len(labels), 512), np.float32)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    return make(ql), ql, rng.integers(1, 7, n_query), make(gl), gl, rng.integers(1, 7, n_gallery)


def run_one(which: str, size: str) -> dict:
    case = features(*SIZES[size])
    t0 = time.perf_counter()
    if which == "ours":
        from toolkit.rerank import RerankParams, evaluate_reranked
        metrics = evaluate_reranked(*case, RerankParams(20, 6, 0.3), progress=True)["reference"]
    else:
        from naive_rerank import naive_rerank

        from toolkit.ranking import evaluate
        final = naive_rerank(case[0], case[3], 20, 6, 0.3, partition=True)
        # the reference ranks by ascending distance: score = -distance; the reversed gallery makes equal
        # distances rank the lower index first, as ours does
        qf, ql, qc, gf, gl, gc = case
        metrics = evaluate(np.eye(len(qf), dtype=np.float32), ql, qc, -final[:, ::-1].T.copy(), gl[::-1], gc[::-1])
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    return {"which": which, "size": size, "seconds": seconds, "peak_gib": peak, "mAP": metrics["mAP"],
            "rank1": metrics["rank1"]}


def measure(which: str, size: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = subprocess.run([sys.executable, __file__, "--child", which, size], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{which} at {size} size failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="market,msmt")
    p.add_argument("--no_reference", action="store_true")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_one(*args.child)))
        return
    print(f"{'size':<8} {'Q x G':>16} {'implementation':<16} {'seconds':>9} {'peak GiB':>9} {'mAP':>9}")
    for size in args.sizes.split(","):
        q, g, _ = SIZES[size]
        rows = [measure("ours", size)]
        if size == "market" and not args.no_reference:
            rows.append(measure("reference", size))
        for r in rows:
            print(f"{size:<8} {f'{q} x {g}':>16} {r['which']:<16} {r['seconds']:9.1f} {r['peak_gib']:9.2f} "
                  f"{r['mAP']:9.6f}", flush=True)
        if len(rows) == 2:
            print(f"  speed-up {rows[1]['seconds'] / rows[0]['seconds']:.1f}x, memory "
                  f"{rows[1]['peak_gib'] / rows[0]['peak_gib']:.1f}x less, |mAP difference| "
                  f"{abs(rows[0]['mAP'] - rows[1]['mAP']):.1e}")


if __name__ == "__main__":
    main()
