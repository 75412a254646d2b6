"""A straightforward NumPy BAFD (recompute every local power after every removal, scipy cdist distances).
The baseline of bench_pruner.py and the independent oracle of the pruner tests."""
import numpy as np
from scipy.spatial.distance import cdist


def distances(weight) -> np.ndarray:
    w = np.asarray(weight, dtype=np.float64).reshape(len(weight), -1)
    return cdist(w, w)


def greedy(d: np.ndarray, steps: int, knn: int, smallest: bool) -> tuple[list[int], list[float]]:
    """Removed filters and their local powers, recomputed from scratch at every step."""
    n = len(d)
    s = list(range(n))
    removed, powers = [], []
    for _ in range(steps):
        sub = d[np.ix_(s, s)]
        lp = np.sort(sub, axis=1)[:, :knn].sum(1)
        mean = sub.sum(1) / n
        ext = lp.min() if smallest else lp.max()
        cand = np.isclose(lp, ext, rtol=1e-5, atol=1e-8)
        m = np.where(cand, mean, np.inf if smallest else -np.inf)
        best = m.min() if smallest else m.max()
        j = int(np.flatnonzero(cand & (m == best))[0])
        removed.append(s[j])
        powers.append(float(lp[j]))
        del s[j]
    return removed, powers


def select(weight, n_prune: int, criterion: str, knn: int = 2, efficient: bool = False) -> list[int]:
    w = np.asarray(weight, dtype=np.float64).reshape(len(weight), -1)
    n = len(w)
    if n_prune == 0:
        return []
    if criterion == "l1":
        return sorted(np.argsort(np.abs(w).sum(1), kind="stable")[:n_prune].tolist())
    if criterion == "l2":
        return sorted(np.argsort(np.linalg.norm(w, axis=1), kind="stable")[:n_prune].tolist())
    d = distances(w)
    if criterion == "fpgm" or knn >= n - n_prune:
        return sorted(np.argsort(d.sum(1), kind="stable")[:n_prune].tolist())
    if efficient and n_prune / n > 0.5:
        keep, _ = greedy(d, n - n_prune, knn, smallest=False)
        return sorted(set(range(n)) - set(keep))
    pruned, _ = greedy(d, n_prune, knn, smallest=True)
    return sorted(pruned)


def score_sequence(weight, knn: int) -> np.ndarray:
    d = distances(weight)
    n = len(d)
    removed, powers = greedy(d, max(n - knn, 0), knn, smallest=True)
    rest = sorted(set(range(n)) - set(removed))
    seq = np.array(powers + d[np.ix_(rest, rest)].sum(1).tolist())
    norm = np.linalg.norm(seq)
    return seq / norm if norm > 0 else seq


def layer_counts(weights: list, prune_rate: float, max_lrate: float, knn: int) -> list[int]:
    """Filters allotted to each ranked layer (before the per-block equalisation)."""
    seqs = [score_sequence(w, knn) for w in weights]
    entries = sorted(((v, li, si) for li, s in enumerate(seqs) for si, v in enumerate(s)))
    sizes = [len(w) for w in weights]
    caps = [int(max_lrate * n) for n in sizes]
    target, counts, total = int(sum(sizes) * prune_rate), [0] * len(weights), 0
    for _, li, _ in entries:
        if total >= target:
            break
        if counts[li] < caps[li]:
            counts[li] += 1
            total += 1
    return counts
