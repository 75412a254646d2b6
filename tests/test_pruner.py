"""pruner.py: criteria on hand-built weights, an independent oracle, allocation rules, masks."""
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

import pruner
from model import ft_net

sys.path.insert(0, str(ROOT / "benchmarks"))
import naive_pruner  # noqa: E402


def points(*xs):
    """1-D 'filters': weight (N, 1, 1, 1) with the given values."""
    return torch.tensor(xs, dtype=torch.float32).view(-1, 1, 1, 1)


def test_l1_and_l2_prune_smallest_norms():
    w = torch.ones(5, 2, 3, 3) * torch.tensor([3.0, 0.5, 2.0, 0.1, 1.0]).view(-1, 1, 1, 1)
    assert pruner.select_filters(w, 2, "l1").tolist() == [1, 3]
    assert pruner.select_filters(w, 3, "l2").tolist() == [1, 3, 4]
    # L1 and L2 disagree: [3, 0, 0, 0] has L1 3 / L2 3; [1, 1, 1, 1] has L1 4 / L2 2
    v = torch.tensor([[3.0, 0, 0, 0], [1, 1, 1, 1]]).view(2, 4, 1, 1)
    assert pruner.select_filters(v, 1, "l1").tolist() == [0]
    assert pruner.select_filters(v, 1, "l2").tolist() == [1]


def test_fpgm_prunes_filters_nearest_the_geometric_median():
    # summed distances: -10: 42, -1: 24, 0: 22, 1: 24, 10: 42 (and the duplicate 0.0 at index 5)
    assert pruner.select_filters(points(-10, -1, 0, 1, 10), 1, "fpgm").tolist() == [2]
    assert pruner.select_filters(points(-10, -1, 0, 1, 10), 3, "fpgm").tolist() == [1, 2, 3]


def test_bafd_tie_goes_to_the_smaller_mean_distance():
    # k=2 local powers: 0 -> 1, 1 -> 1, 5 -> 4, 20 -> 15. Filters 0 and 1 tie; filter 1 has the smaller
    # mean distance (24/4 < 26/4), so it goes first although filter 0 has the lower index.
    assert pruner.select_filters(points(0, 1, 5, 20), 1, "bafd", knn=2).tolist() == [1]


def test_bafd_greedy_updates_local_powers():
    # powers 0 -> 1, 1 -> 1 (tie; summed distances 326 vs 322): 1 goes. Then 0 -> 5, 5 -> 5 (sums 325 vs
    # 310): 5 goes. Then 0 -> 20, 20 -> 20 (sums 320 vs 280): 20 goes, although 0 has the lower index.
    w = points(0, 1, 5, 20, 100, 200)
    assert pruner.select_filters(w, 3, "bafd", knn=2).tolist() == [1, 2, 3]
    assert naive_pruner.select(w.numpy(), 3, "bafd", 2) == [1, 2, 3]


def test_bafd_efficient_builds_the_keep_set():
    # keep 2 of 6: largest local power first: 20 and 30 tie (10), 30 has the larger mean -> kept,
    # then 20 (10 to its nearest) is kept; the tight cluster and 10 are pruned
    w = points(0, 0.1, 0.2, 10, 20, 30)
    assert pruner.select_filters(w, 4, "bafd", knn=2, efficient=True).tolist() == [0, 1, 2, 3]
    assert naive_pruner.select(w.numpy(), 4, "bafd", 2, True) == [0, 1, 2, 3]
    # below 0.5 the efficient flag changes nothing
    assert (pruner.select_filters(w, 3, "bafd", knn=2, efficient=True).tolist()
            == pruner.select_filters(w, 3, "bafd", knn=2).tolist())


def test_bafd_global_rule_when_k_reaches_the_kept_count():
    w = points(-10, -1, 0, 1, 10, 11)
    # N - n_prune = 2 <= knn = 3: prune the 4 smallest summed distances to all filters (like FPGM)
    assert (pruner.select_filters(w, 4, "bafd", knn=3).tolist()
            == pruner.select_filters(w, 4, "fpgm").tolist())


def test_duplicates_are_exactly_zero_apart():
    w = torch.randn(6, 3, 3, 3)
    w[4] = w[1]
    w[5] = 0
    w[3] = 0
    d = pruner.distance_matrix(w)
    assert d[1, 4] == 0 and d[3, 5] == 0 and torch.equal(d, d.T) and torch.all(d.diagonal() == 0)
    ref = naive_pruner.distances(w.numpy())
    assert np.allclose(d.numpy(), ref, rtol=1e-12, atol=1e-12)


def duplicate_groups(w: np.ndarray) -> np.ndarray:
    _, inverse = np.unique(w.reshape(len(w), -1), axis=0, return_inverse=True)
    return inverse.ravel()


@pytest.mark.parametrize("kind", ["plain", "decayed", "duplicated", "zeros"])
def test_matches_the_straightforward_implementation(kind):
    """Every criterion, rate, k and path against the recompute-everything oracle (duplicates are
    interchangeable, so selections are compared as multisets of duplicate groups)."""
    rng = np.random.default_rng({"plain": 0, "decayed": 1, "duplicated": 2, "zeros": 3}[kind])
    for _ in range(60):
        n = int(rng.integers(3, 40))
        w = rng.normal(size=(n, int(rng.integers(1, 4)), 3, 3)).astype(np.float32)
        if kind == "decayed":
            w[rng.random(n) < 0.4] *= np.float32(0.3) ** rng.integers(1, 6)
        elif kind == "duplicated":
            w[rng.integers(0, n, n // 3)] = w[rng.integers(0, n, n // 3)]
        elif kind == "zeros":
            w[rng.random(n) < 0.3] = 0
        groups = duplicate_groups(w)
        for criterion in ["l1", "l2", "fpgm", "bafd"]:
            rate, knn, efficient = float(rng.choice([0.1, 0.3, 0.5, 0.6, 0.9, 0.95])), int(rng.integers(1, 5)), bool(
                rng.integers(0, 2))
            n_prune = int(n * rate)
            ours = pruner.select_filters(torch.from_numpy(w), n_prune, criterion, knn, efficient).tolist()
            oracle = naive_pruner.select(w, n_prune, criterion, knn, efficient)
            assert sorted(groups[ours]) == sorted(groups[oracle]), (criterion, n, n_prune, knn, efficient)


def test_allocation_matches_the_straightforward_walk():
    rng = np.random.default_rng(5)
    for t in range(25):
        weights = [rng.normal(size=(int(rng.integers(3, 24)), 2, 3, 3)).astype(np.float32) * rng.uniform(0.1, 2)
                   for _ in range(int(rng.integers(1, 5)))]
        if t % 3 == 1:
            weights[0][1] = weights[0][0]
        prune_rate = float(rng.uniform(0.1, 0.95))
        max_lrate, knn = float(rng.uniform(prune_rate, 0.99)), int(rng.integers(1, 4))
        ours = pruner.allocate_filters([torch.from_numpy(w) for w in weights], prune_rate, max_lrate, knn)
        assert ours == naive_pruner.layer_counts(weights, prune_rate, max_lrate, knn)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_allocation_invariants(arch):
    torch.manual_seed(0)
    net = ft_net(10, arch)
    prune_rate, max_lrate = 0.9, 0.95
    rates = pruner.bafd_layer_rates(net, arch, prune_rate, max_lrate, knn=2)
    params = dict(net.named_parameters())
    convs = [n for n, p in params.items() if p.dim() == 4 and "downsample" not in n]
    expected = convs if arch == "resnet50" else [n for n in convs if n != "model.conv1.weight"]
    assert list(rates) == expected  # exactly the pruned layer set, in model order
    ranked = [n for n in rates if arch != "resnet50" or n == "model.conv1.weight" or ".conv2." in n]
    sizes = {n: params[n].shape[0] for n in rates}
    removed = sum(int(sizes[n] * rates[n]) for n in ranked)
    assert removed <= int(sum(sizes[n] for n in ranked) * prune_rate)
    assert removed >= int(sum(sizes[n] for n in ranked) * prune_rate) - len(ranked)  # floor losses only
    for n in rates:
        assert int(sizes[n] * rates[n]) <= int(max_lrate * sizes[n])
    blocks = {}
    for n in rates:
        if n != "model.conv1.weight":
            blocks.setdefault(n.rsplit(".", 2)[0], []).append(rates[n])
    for block_rates in blocks.values():
        assert len(set(block_rates)) == 1
    assert ("model.conv1.weight" in rates) == (arch == "resnet50")


def test_mask_soft_and_hard_touch_only_the_selection():
    torch.manual_seed(0)
    net = ft_net(5, "resnet18")
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.bias.data.uniform_(0.1, 1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    mask = pruner.FilterMask("resnet18", pruner.uniform_rates("resnet18", 0.5), "l2")
    selected = mask.select(net)
    mask.apply(net, 0.3)
    after = net.state_dict()
    name = "model.layer2.1.conv1.weight"
    idx = selected[name]
    keep = torch.ones(after[name].shape[0], dtype=torch.bool)
    keep[idx] = False
    for key in [name, "model.layer2.1.bn1.weight", "model.layer2.1.bn1.bias"]:
        assert torch.equal(after[key][idx], before[key][idx] * 0.3)
        assert torch.equal(after[key][keep], before[key][keep])
    assert torch.equal(after["model.conv1.weight"], before["model.conv1.weight"])  # stem not pruned for r18
    zeroed = mask.zeroed_state(net)
    fresh = pruner.select_layers(net, mask.rates, "l2")
    assert torch.all(zeroed[name][fresh[name]] == 0) and torch.equal(after[name], net.state_dict()[name])
    mask.apply(net, 0.0)
    assert torch.all(net.state_dict()["model.layer2.1.bn1.bias"][idx] == 0)
    state = mask.state_dict()
    other = pruner.FilterMask("resnet18", {}, "l2")
    other.load_state_dict(state)
    assert all(torch.equal(other.selected[k], v) for k, v in selected.items())


def test_unknown_criterion_and_bad_rates_are_errors():
    with pytest.raises(pruner.PruneError):
        pruner.select_filters(torch.randn(4, 1, 1, 1), 1, "l3")
    with pytest.raises(pruner.PruneError):
        pruner.uniform_rates("resnet18", 1.2)
    with pytest.raises(pruner.PruneError):
        pruner.pruned_convs("vgg16")
