"""Circle and softmax losses, --loss parsing and the learning-rate warm-up."""
import math

import pytest
import torch
import torch.nn.functional as F

from toolkit import losses, train_loop


def circle_by_hand(feats, labels, m=0.25, gamma=64.0):
    """The circle loss written pair by pair with Python floats (mean over anchors with both pair kinds)."""
    total = 0.0
    for i in range(len(feats)):
        lp, ln = [], []
        for j in range(len(feats)):
            if j == i:
                continue
            s = sum(a * b for a, b in zip(feats[i], feats[j]))
            if labels[j] == labels[i]:
                lp.append(-gamma * max(1 + m - s, 0) * (s - (1 - m)))
            else:
                ln.append(gamma * max(s + m, 0) * (s - m))
        if lp and ln:
            lse = lambda v: max(v) + math.log(sum(math.exp(x - max(v)) for x in v))  # noqa: E731
            total += math.log1p(math.exp(lse(lp) + lse(ln)))
    return total / len(feats)


def test_circle_loss_two_pairs_by_hand():
    # anchor a=(1,0): positive b at 60 degrees (s=0.5), negative c at 90 degrees (s=0)
    f = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    loss = losses.circle_loss(f[:1], labels[:1], f, labels, offset=0, total=1)
    # logit_p = -64 * (1.25 - 0.5) * (0.5 - 0.75) = 12, logit_n = 64 * 0.25 * (0 - 0.25) = -4
    assert loss.item() == pytest.approx(math.log1p(math.exp(8.0)), rel=1e-12)


def test_circle_loss_matches_the_pairwise_formula_and_passes_gradients():
    gen = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(8, 5, generator=gen, dtype=torch.float64), dim=1).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])  # id 2 has no positive: its anchor adds 0
    loss = losses.circle_loss(f, labels, f, labels, offset=0, total=8)
    assert loss.item() == pytest.approx(circle_by_hand(f.tolist(), labels.tolist()), rel=1e-10)
    loss.backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_circle_loss_shards_add_up_to_the_whole_batch():
    gen = torch.Generator().manual_seed(1)
    f = F.normalize(torch.randn(6, 4, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    whole = losses.circle_loss(f, labels, f, labels, 0, 6)
    parts = sum(losses.circle_loss(f[s:s + 3], labels[s:s + 3], f, labels, s, 6) for s in (0, 3))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-12)


def test_circle_loss_without_any_usable_anchor_is_zero_with_a_gradient_path():
    f = F.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    loss = losses.circle_loss(f, torch.tensor([0, 0, 0]), f, torch.tensor([0, 0, 0]), 0, 3)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(f.grad, torch.zeros_like(f))


def test_softmax_loss_is_the_batch_mean_cross_entropy():
    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(10) % 4
    assert losses.softmax_loss(logits, labels, 10).item() == pytest.approx(F.cross_entropy(logits, labels).item())


def test_batch_loss_sums_the_chosen_terms():
    gen = torch.Generator().manual_seed(3)
    f = F.normalize(torch.randn(2, 6, generator=gen), dim=1)
    pf = F.normalize(torch.randn(8, 6, generator=gen), dim=1)
    logits, plogits = torch.randn(2, 3, generator=gen), torch.randn(8, 3, generator=gen)
    labels = torch.tensor([0, 2])

    def value(spec):
        loss, stats = losses.batch_loss(losses.parse_losses(spec), f, pf, logits, plogits, labels, 0.3, 8,
                                        torch.Generator().manual_seed(4))
        return loss.item(), stats

    parts = {name: value(name)[0] for name in losses.LOSSES}
    combined, stats = value("triplet+circle+softmax")
    assert combined == pytest.approx(sum(parts.values()), rel=1e-6)
    assert all(v > 0 for v in parts.values())
    assert 0 <= int(stats["id_correct"]) <= 10 and "id_correct" not in value("circle")[1]


@pytest.mark.parametrize("spec", ["", "arcface", "circle+circle", "softmax+"])
def test_bad_loss_names_are_errors(spec):
    if spec == "softmax+":
        assert losses.parse_losses(spec) == ("softmax",)
        return
    with pytest.raises(losses.LossError, match="--loss"):
        losses.parse_losses(spec)


def test_warmup_rises_linearly_from_a_tenth():
    factors = [train_loop.warmup_factor(s, 10) for s in range(12)]
    assert factors[0] == pytest.approx(0.1) and factors[5] == pytest.approx(0.55)
    assert factors[10:] == [1.0, 1.0]
    assert all(b > a for a, b in zip(factors[:10], factors[1:11]))
    assert train_loop.warmup_factor(0, 0) == 1.0
