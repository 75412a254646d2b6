"""Taylor importance (toolkit.hooks.taylor_scores) against an independent computation: the gradient of the
loss with respect to a multiplicative gate of 1 on each output channel is exactly sum(activation x gradient)
of that channel, so per batch |d loss / d gate| must equal the score's increment."""
import torch

import pruner
from model import ft_net
from toolkit.hooks import METHODS, taylor_scores


def tiny_batches(n: int, seed: int = 0) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 32, 16, generator=g), torch.randint(0, 3, (4,), generator=g),
             torch.randn(4, 1, 3, 32, 16, generator=g)) for _ in range(n)]


def classification_loss(net, imgs, labels, positives):
    logits, _ = net(imgs)
    return torch.nn.functional.cross_entropy(logits, labels)


def gate_scores(net, convs: dict, batches) -> dict:
    """Brute force: per batch, |d loss / d gate_c| with gate = ones multiplying each conv's output."""
    out = {name: torch.zeros(conv.out_channels, dtype=torch.float64) for name, conv in convs.items()}
    net.eval()
    for imgs, labels, positives in batches:
        gates = {name: torch.ones(conv.out_channels, requires_grad=True) for name, conv in convs.items()}
        handles = [conv.register_forward_hook(lambda m, i, o, g=gates[name]: o * g.view(1, -1, 1, 1))
                   for name, conv in convs.items()]
        net.zero_grad()
        classification_loss(net, imgs, labels, positives).backward()
        for h in handles:
            h.remove()
        for name in convs:
            out[name] += gates[name].grad.double().abs()
    return out


def test_taylor_scores_equal_the_gate_gradients_and_select_the_least_important():
    torch.manual_seed(0)
    net = ft_net(3, "resnet18")
    layers = pruner.pruned_convs("resnet18")[:5]
    convs = {layer.weight: net.get_submodule(layer.conv) for layer in layers}
    batches = tiny_batches(3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    scores = taylor_scores(net, convs, batches, classification_loss)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BN statistics untouched
    assert all(p.grad is None for p in net.parameters()) and net.training
    brute = gate_scores(net, convs, batches)
    for name in convs:
        assert torch.allclose(scores[name], brute[name], rtol=1e-4, atol=1e-9), name
        assert (scores[name] > 0).any()
    name = layers[0].weight
    n_prune = 20
    chosen = pruner.select_filters(net.get_parameter(name), n_prune, "taylor", scores=scores[name])
    expected = torch.sort(torch.argsort(brute[name], stable=True)[:n_prune]).values
    assert torch.equal(chosen, expected)


def test_taylor_is_one_registry_entry_and_one_methods_row():
    assert pruner.CRITERIA_REGISTRY["taylor"].needs == "taylor"
    assert METHODS["taylor"].criterion == "taylor" and METHODS["taylor"].checkpoint == "zeroed"
    weight = torch.randn(6, 2, 3, 3)
    ties = torch.tensor([3.0, 1.0, 1.0, 2.0, 0.5, 1.0])
    assert pruner.select_filters(weight, 3, "taylor", scores=ties).tolist() == [1, 2, 4]  # ties: lower index first
    try:
        pruner.select_filters(weight, 3, "taylor")
    except pruner.PruneError as e:
        assert "needs one accumulated score per filter" in str(e)
    else:
        raise AssertionError("taylor without scores must be refused")
