"""The shared loop: mining, loss, learning, resume, test.py's .mat layout."""

import numpy as np
import pytest
import scipy.io
import torch
from conftest import TRAINED_RESNET18, make_args, run_script

from evaluate_gpu import evaluate
from toolkit import losses, train_loop


def test_mining_picks_hardest_positive_and_negative():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = lambda deg: [np.cos(np.radians(deg)), np.sin(np.radians(deg))]  # noqa: E731
    # anchor 0 (id 0) positives at 10, 50, 20, 5 degrees; anchor 1 (id 1) at 80, 85, 30, 89
    pf = torch.tensor([c(10), c(50), c(20), c(5), c(80), c(85), c(30), c(89)], dtype=torch.float32)
    labels = torch.tensor([0, 1])
    s_pos, s_neg = losses.mine_triplets(f, pf, labels, poolsize=8)
    assert torch.allclose(s_pos, torch.tensor([np.cos(np.radians(50)), np.cos(np.radians(60))], dtype=torch.float32))
    # anchor 0's hardest negative is anchor 1's positive at 30 deg; anchor 1's is anchor 0's at 50 deg
    assert torch.allclose(s_neg, torch.tensor([np.cos(np.radians(30)), np.cos(np.radians(40))], dtype=torch.float32))
    loss = losses.triplet_loss(s_pos, s_neg, 0.3)
    assert loss.item() == pytest.approx(float(torch.relu(s_neg - s_pos + 0.3).sum()))


def test_mining_without_negative_in_pool_scores_zero_and_keeps_gradient():
    f = torch.nn.functional.normalize(torch.randn(2, 4), dim=1).requires_grad_()
    pf = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    s_pos, s_neg = losses.mine_triplets(f, pf, torch.tensor([3, 3]), poolsize=8)
    assert torch.all(s_neg == 0)
    losses.triplet_loss(s_pos, s_neg, 0.3).backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def features_map(net, root, size: tuple[int, int]) -> float:
    from toolkit import data
    from toolkit.features import extract_features
    t = data.test_transform(size)
    out = []
    for split in ("query", "gallery"):
        ds = data.ReidImages(root / "pytorch" / split, t)
        out += [extract_features(net, ds, torch.device("cpu"), 64, 0), ds.labels, ds.cams]
    return evaluate(*out, device="cpu")["mAP"]


def test_training_lowers_loss_and_beats_untrained(synthetic_market, trained_resnet18):
    from toolkit.surgery import model_from_state_dict
    run = trained_resnet18.parent
    args = make_args(synthetic_market, run.parent.parent, **TRAINED_RESNET18)
    torch.manual_seed(args.seed)
    untrained = train_loop.default_model(args, 6)
    net = model_from_state_dict(torch.load(trained_resnet18, weights_only=True))
    log = (run / "log.csv").read_text().splitlines()
    losses = [float(line.split(",")[1]) for line in log[1:]]
    assert len(losses) == 4 and losses[-1] < losses[0]
    size = (args.height, args.width)
    before, after = features_map(untrained, synthetic_market, size), features_map(net, synthetic_market, size)
    assert after > before + 0.15, (before, after)
    out = run
    assert {"net_last.pth", "opts.yaml", "log.csv", "resume.pth"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob(".*.tmp")), "atomic writes leave no temporaries"
    torch.load(out / "resume.pth", weights_only=True)  # plain tensors and values only


def test_resume_without_state_is_a_clear_error(synthetic_market, tmp_path):
    res = run_script("APFP_train.py", "--data_dir", synthetic_market / "pytorch", "--results_dir", tmp_path,
                     "--resume", "--no_pretrained", "--network_arch", "resnet18")
    assert res.returncode == 2 and "resume.pth does not exist" in res.stderr


def test_test_py_writes_reference_mat_layout(synthetic_market, tmp_path):
    from model import ft_net
    run = tmp_path / "ft_resnet18" / "r"
    run.mkdir(parents=True)
    torch.save(ft_net(6, "resnet18").state_dict(), run / "net_last.pth")
    res = run_script("test.py", "--name", "r", "--results_dir", tmp_path, "--test_dir", synthetic_market / "pytorch",
                     "--height", "64", "--width", "32", "--workers", "0", "--multi", "--mat", tmp_path / "out.mat")
    assert res.returncode == 0, res.stderr
    assert "GMACs" in res.stdout and "params" in res.stdout
    mat = scipy.io.loadmat(tmp_path / "out.mat")
    n_query = len(list((synthetic_market / "query").iterdir()))
    assert mat["query_f"].shape == (n_query, 512) and mat["query_label"].shape == (1, n_query)
    assert mat["gallery_label"].shape[0] == 1 and mat["gallery_cam"].shape[0] == 1
    assert -1 in mat["gallery_label"] and 0 in mat["gallery_label"]
    assert np.allclose(np.linalg.norm(mat["gallery_f"], axis=1), 1, atol=1e-5)
    assert (tmp_path / "multi_query.mat").is_file()
    bad = run_script("test.py", "--name", "missing", "--results_dir", tmp_path)
    assert bad.returncode == 2 and "no run" in bad.stderr


def test_test_py_parses_msmt_two_digit_cameras(tmp_path):
    from make_synthetic_data import generate
    from model import ft_net
    from toolkit.layouts import prepare_msmt
    root = tmp_path / "MSMT17_V1"
    generate("msmt", root, n_ids=6, per_id=6, n_cams=15, seed=1)
    prepare_msmt(root)
    torch.save(ft_net(3, "resnet18").state_dict(), tmp_path / "net_last.pth")
    res = run_script("test.py", "--name", tmp_path, "--test_dir", root / "pytorch", "--height", "64", "--width", "32",
                     "--workers", "0", "--mat", tmp_path / "m.mat")
    assert res.returncode == 0, res.stderr
    mat = scipy.io.loadmat(tmp_path / "m.mat")
    from toolkit.layouts import parse_name
    expected = sorted(parse_name(p.name)[1] for p in (root / "pytorch" / "query").rglob("*.jpg"))
    assert sorted(mat["query_cam"].ravel().tolist()) == expected
    assert max(expected) >= 10


def test_pretrained_accepts_a_trained_ft_net_checkpoint(tmp_path):
    from model import ft_net
    torch.manual_seed(1)
    trained = ft_net(6, "resnet18")
    torch.save(trained.state_dict(), tmp_path / "net.pth")
    args = make_args(tmp_path, tmp_path, pretrained=str(tmp_path / "net.pth"), no_pretrained=False)
    same = train_loop.default_model(args, 6)
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), trained.state_dict().values()))
    other = train_loop.default_model(args, 9)  # another dataset: backbone and neck kept, new classifier
    assert torch.equal(other.model.layer4[1].conv2.weight, trained.model.layer4[1].conv2.weight)
    assert other.classifier.classifier[0].weight.shape[0] == 9
    args.network_arch = "resnet34"
    with pytest.raises(train_loop.model_lib.ModelError, match="does not fit"):
        train_loop.default_model(args, 6)
