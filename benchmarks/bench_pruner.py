"""BAFD speed on ft_net ResNet-50 (prune_rate 0.9, max_lrate 0.95, knn 2, efficient), 2-core CPU targets:
<= 1 s for one epoch-end re-selection + decay, <= 1 s for the layer-rate allocation.

    python benchmarks/bench_pruner.py            # ours, then the straightforward NumPy version
    python benchmarks/bench_pruner.py --quick    # the straightforward version on a few layers only

The straightforward version (benchmarks/naive_pruner.py) recomputes every local power after every removal,
as a direct reading of the method does. Selections of both are compared.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import naive_pruner  # noqa: E402

import pruner  # noqa: E402
from model import ft_net  # noqa: E402

ARCH, PRUNE_RATE, MAX_LRATE, KNN = "resnet50", 0.9, 0.95, 2


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def naive_epoch_end(net, rates, names):
    params = dict(net.named_parameters())
    selected = {}
    for name in names:
        w = params[name].detach().numpy()
        n_prune = int(w.shape[0] * rates[name])
        selected[name] = naive_pruner.select(w, n_prune, "bafd", KNN, rates[name] > 0.5)
    return selected


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="time the straightforward version on a few layers only")
    p.add_argument("--repeats", type=int, default=3, help="runs of ours (median reported)")
    args = p.parse_args()
    torch.manual_seed(0)
    net = ft_net(751, ARCH)
    print(f"ft_net {ARCH}, prune_rate {PRUNE_RATE}, max_lrate {MAX_LRATE}, knn {KNN}, efficient, "
          f"{torch.get_num_threads()} threads")
    pruner.bafd_layer_rates(net, ARCH, PRUNE_RATE, MAX_LRATE, KNN)  # warm-up
    t_alloc, rates = timed(lambda: pruner.bafd_layer_rates(net, ARCH, PRUNE_RATE, MAX_LRATE, KNN), args.repeats)
    mask = pruner.FilterMask(ARCH, rates, "bafd", KNN, efficient=True)
    mask.select(net)  # warm-up (workspace)
    state = {k: v.clone() for k, v in net.state_dict().items()}

    def epoch_end():
        mask.select(net)
        mask.apply(net, 0.3)
        return mask.selected

    t_epoch, selected = timed(epoch_end, args.repeats)
    net.load_state_dict(state)
    selected = mask.select(net)
    n_filters = sum(p.shape[0] for n, p in net.named_parameters() if n in rates)
    print(f"ours: allocation {t_alloc:.2f} s, epoch-end update {t_epoch:.2f} s "
          f"({sum(len(v) for v in selected.values())} of {n_filters} "
          f"filters selected; median of {args.repeats})")

    names = list(rates)
    ranked = [n for n in names if n == "model.conv1.weight" or ".conv2." in n]
    if args.quick:
        names = [n for n in names if "layer1" in n or "layer2.0" in n]
        ranked = [n for n in ranked if "layer1" in n or "layer2.0" in n]
    params = dict(net.named_parameters())
    t0 = time.perf_counter()
    naive_sel = naive_epoch_end(net, rates, names)
    t_naive_epoch = time.perf_counter() - t0
    assert all(naive_sel[n] == selected[n].tolist() for n in names), "selections differ"
    t0 = time.perf_counter()
    for n in ranked:
        naive_pruner.score_sequence(params[n].detach().numpy(), KNN)
    t_naive_alloc = time.perf_counter() - t0
    scope = "on layer1 + layer2.0 only (--quick)" if args.quick else "whole network"
    print(f"straightforward ({scope}): allocation sequences {t_naive_alloc:.1f} s, epoch-end update "
          f"{t_naive_epoch:.1f} s (same selections)")
    if not args.quick:
        print(f"speed-up: allocation {t_naive_alloc / t_alloc:.0f}x, epoch-end {t_naive_epoch / t_epoch:.0f}x")


if __name__ == "__main__":
    main()
