"""Rank-k, mAP and mINP of the features in pytorch_result.mat, vectorised over chunks of queries.

    python evaluate_gpu.py                        # ./pytorch_result.mat, reference protocol
    python evaluate_gpu.py --protocol standard    # also mINP; queries without a match are skipped
    python evaluate_gpu.py --gpu_ids 0            # score products on a GPU (imports torch)
    python evaluate_gpu.py --rerank               # k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3)
    python evaluate_gpu.py --show_ranks ranks.png --worst   # picture of the 8 worst queries' top 10

Ranking: gallery sorted by descending score = gallery . query (float32); equal scores are ordered with
the larger gallery index first (the reverse of a stable ascending sort, as the reference's argsort
then [::-1] does on small inputs). Junk = label -1, and the query's id in the query's camera.
No query x gallery matrix is ever sorted or held whole: per chunk of queries, only gallery items that
score at least as high as the query's worst good match are compared, as exact (score, index) int64 keys.

The algorithm is NumPy throughout, so the CPU path never imports torch (about 2 s of every call).
With --gpu_ids/--device cuda only the score products run on the GPU; everything after them is the
same NumPy code.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from toolkit import cli
from toolkit.ranking import (  # noqa: F401
    CHUNK_ELEMENTS,
    INT64_MAX,
    RESULT_KEYS,
    EvaluationError,
    GalleryIndex,
    average_precision,
    both_protocols,
    check_inputs,
    evaluate,
    evaluate_protocols,
    feature_query_results,
    format_result,
    good_match_ranks,
    load_mat,
    multi_query_features,
    multi_query_file,
    multi_query_of,
    ordered_keys,
    score_function,
    summarize,
)

if TYPE_CHECKING:
    from toolkit.rerank import KReciprocal

def get_args_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mat", default="pytorch_result.mat", help="features from test.py")
    p.add_argument("--multi_mat", default=None,
                   help="multi-query features from test.py --multi, evaluated too when the file exists "
                        "(default: multi_query.mat beside --mat)")
    p.add_argument("--protocol", choices=["reference", "standard"], default="reference",
                   help="reference: trapezoid AP, divide by all queries; standard: AP and mINP over valid queries")
    p.add_argument("--gpu_ids", default=None,
                   help="compute the score products on this GPU (e.g. 0; imports torch); default: the CPU, "
                        "which for one evaluation is usually faster than starting CUDA")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (the same choice as --gpu_ids; default cpu)")
    p.add_argument("--json", default=None, help="also write the metrics (both protocols) to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json or --show_ranks file")
    r = p.add_argument_group("k-reciprocal re-ranking (Zhong et al., CVPR 2017; layumi's variant)")
    r.add_argument("--rerank", action="store_true", help="rank by the re-ranked distances")
    r.add_argument("--k1", type=cli.positive_int, default=None, help="size of the k-reciprocal neighbourhood (20)")
    r.add_argument("--k2", type=cli.positive_int, default=None,
                   help="neighbours averaged in query expansion (6; 1: none)")
    r.add_argument("--lambda_value", type=cli.probability, default=None,
                   help="weight of the original distance against the Jaccard distance (0.3)")
    v = p.add_argument_group("rank-list picture")
    v.add_argument("--show_ranks", default=None, metavar="PNG",
                   help="draw the chosen queries beside their top-ranked gallery images into this PNG file")
    v.add_argument("--queries", type=cli.positive_int, default=None, help="queries drawn (8)")
    v.add_argument("--top", type=cli.positive_int, default=None, help="gallery images shown per query (10)")
    v.add_argument("--seed", type=cli.nonnegative_int, default=None, help="seed of the random choice of queries (0)")
    v.add_argument("--worst", action="store_true",
                   help="draw the queries with the lowest AP (among those with a match) instead of random ones")
    return p


RERANK_DEFAULTS = {"k1": 20, "k2": 6, "lambda_value": 0.3}
PICTURE_DEFAULTS = {"queries": 8, "top": 10, "seed": 0}


def check_args(args: argparse.Namespace) -> None:
    """Flag combinations and outputs, before anything is read or computed; fills in the defaults."""
    for flags, owner, on in ((RERANK_DEFAULTS, "--rerank", args.rerank),
                             ({**PICTURE_DEFAULTS, "worst": False}, "--show_ranks", args.show_ranks)):
        given = [f"--{k}" for k in flags if getattr(args, k) not in (None, False)]
        if given and not on:
            raise EvaluationError(f"{', '.join(given)} given without {owner}")
        for k, default in flags.items():
            if getattr(args, k) is None:
                setattr(args, k, default)
    if args.rerank and args.k2 > args.k1 + 1:
        raise EvaluationError(f"--k2 ({args.k2}) must be at most --k1 + 1 ({args.k1 + 1}): query expansion "
                              "averages the first k2 of the k1 + 1 nearest images")
    try:
        cli.check_outputs({"--json": args.json, "--show_ranks": args.show_ranks},
                          {"--mat": args.mat, "--multi_mat": args.multi_mat}, args.overwrite)
    except cli.UsageError as e:
        raise EvaluationError(str(e)) from None
    if args.show_ranks and Path(args.show_ranks).suffix.lower() != ".png":
        raise EvaluationError(f"--show_ranks {args.show_ranks}: the picture is written as PNG, name it *.png")


def choose_device(args: argparse.Namespace) -> str:
    if args.device and args.gpu_ids is not None:
        raise EvaluationError("give --gpu_ids or --device, not both")
    if args.device:
        if args.device != "cpu" and not args.device.startswith("cuda"):
            raise EvaluationError(f"--device must be cpu or cuda[:N], got {args.device!r}")
        return args.device
    if args.gpu_ids is None or args.gpu_ids.strip() in ("", "-1"):
        return "cpu"
    first = args.gpu_ids.split(",")[0].strip()
    if not first.isdigit():
        raise EvaluationError(f"--gpu_ids must be GPU numbers such as 0 or 0,1, got {args.gpu_ids!r}")
    return f"cuda:{first}"


def score(arrays: tuple, args: argparse.Namespace, device: str) -> tuple[dict, dict, KReciprocal | None]:
    """(metrics of both protocols, per-query results, the re-ranker when --rerank) of checked arrays."""
    if not args.rerank:
        per_query = feature_query_results(*arrays, device)
        return summarize(per_query), per_query, None
    from toolkit.rerank import RerankParams, rerank_query_results  # SciPy's sparse module: only when asked
    params = RerankParams(args.k1, args.k2, args.lambda_value, "layumi")
    per_query, reranker = rerank_query_results(*arrays, params, device, progress=None)
    return summarize(per_query), per_query, reranker


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    device = choose_device(args)
    mat = load_mat(args.mat, RESULT_KEYS)
    if args.show_ranks:
        paths = mat_paths(mat, args.mat)
    q = (mat["query_f"], mat["query_label"], mat["query_cam"])
    g = (mat["gallery_f"], mat["gallery_label"], mat["gallery_cam"])
    try:
        arrays = check_inputs(*q, *g)
        both, per_query, reranker = score(arrays, args, device)
    except EvaluationError as e:
        raise EvaluationError(f"{args.mat}: {e}") from None
    result = both[args.protocol]
    if args.rerank:
        result["rerank"] = {"k1": args.k1, "k2": args.k2, "lambda": args.lambda_value}
    print(("re-ranked " if args.rerank else "") + format_result(result, args.protocol))
    found = multi_query_file(args.mat, args.multi_mat)
    if found is not None and not found[1]:
        print(f"note: ignoring {found[0]}, older than {args.mat} (written by an earlier test.py --multi run)")
    elif found is not None:
        multi = score((multi_query_of(found[0], q), *arrays[1:]), args, device)[0][args.protocol]
        print("multi Rank@1:%f Rank@5:%f Rank@10:%f mAP:%f" % (multi["rank1"], multi["rank5"], multi["rank10"],
                                                                multi["mAP"]))
        result["multi"] = multi
    if args.show_ranks:
        draw_ranks(arrays, paths, per_query, reranker, args)
    if args.json:  # both protocols, so collected tables need no recomputation
        from toolkit.atomic_io import write_text_atomic
        result = both_protocols(result, both, args.protocol)
        try:
            write_text_atomic(json.dumps(result, indent=2), args.json)
        except OSError as e:
            raise EvaluationError(f"cannot write {args.json}: {e.strerror}") from None
    return result


def mat_paths(mat: dict, path: str) -> tuple[list[str], list[str]]:
    """The image paths test.py stores beside the features (files written before it did have none)."""
    if "query_path" not in mat or "gallery_path" not in mat:
        raise EvaluationError(f"{path} holds no image paths (written by an older test.py): re-run test.py "
                              "to draw rank lists")
    out = []
    for split in ("query", "gallery"):
        names = [str(p).rstrip() for p in np.asarray(mat[f"{split}_path"]).reshape(-1)]
        if len(names) != len(np.asarray(mat[f"{split}_f"])):
            raise EvaluationError(f"{path}: {split}_path has {len(names)} entries for "
                                  f"{len(np.asarray(mat[f'{split}_f']))} feature rows")
        out.append(names)
    return out[0], out[1]


def choose_queries(per_query: dict, n: int, seed: int, worst: bool, protocol: str) -> np.ndarray:
    """Reproducible query choice: random (seeded), or the lowest AP among queries with a match."""
    n_query = len(per_query["has_match"])
    if worst:
        candidates = np.flatnonzero(per_query["has_match"])
        ap = per_query[f"ap_{protocol}"][candidates]
        return candidates[np.lexsort((candidates, ap))][:n]
    return np.sort(np.random.default_rng(seed).choice(n_query, size=min(n, n_query), replace=False))


def draw_ranks(arrays: tuple, paths: tuple[list[str], list[str]], per_query: dict,
               reranker: KReciprocal | None, args: argparse.Namespace) -> None:
    from toolkit.rank_pictures import RankRow, cell_kinds, draw_rank_rows, save_png  # Pillow: only when asked
    qf, ql, qc, gf, gl, gc = arrays
    chosen = choose_queries(per_query, args.queries, args.seed, args.worst, args.protocol)
    if len(chosen) == 0:
        raise EvaluationError(f"{args.mat}: no query has a match in the gallery, so --worst has none to draw")
    top = min(args.top, len(gf))
    rows = []
    for i in chosen:
        if reranker is None:  # descending score, equal scores: the larger gallery index first
            s = gf @ qf[i]
            order = np.lexsort((-np.arange(len(gf)), -s))[:top]
        else:  # ascending distance, equal distances: the lower gallery index first
            order = np.lexsort((np.arange(len(gf)), reranker.final_distances(int(i), int(i) + 1)[0]))[:top]
        kinds = cell_kinds(ql[i], qc[i], gl[order], gc[order])
        caption = f"query {i}, id {ql[i]}, AP = {per_query[f'ap_{args.protocol}'][i]:.3f}"
        rows.append(RankRow(paths[0][i], caption, [(paths[1][j], k) for j, k in zip(order, kinds)]))
    save_png(draw_rank_rows(rows, top), args.show_ranks)
    print(f"wrote {args.show_ranks}: {len(rows)} queries x top {top}")


if __name__ == "__main__":
    cli.run_main(main, get_args_parser().parse_args())
