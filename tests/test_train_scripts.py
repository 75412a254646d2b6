"""The five train scripts end to end on tiny synthetic data (CPU), and BAFD's resume."""
import pytest
import torch
from conftest import run_script

import APFP_train
import pruner
from toolkit import hooks, train_loop
from toolkit.surgery import model_from_state_dict

COMMON = ["--train_all", "--network_arch", "resnet18", "--no_pretrained", "--Epochs", "2", "--batchsize", "8",
          "--height", "32", "--width", "16", "--workers", "0", "--lr", "0.1", "--prune_rate", "0.5"]


def zero_filters_per_layer(state: dict, names) -> dict[str, int]:
    return {n: int((state[n].flatten(1).abs().sum(1) == 0).sum()) for n in names}


@pytest.mark.parametrize("script,criterion", [("APFP_train.py", "bafd"), ("SFP_train.py", "l2"),
                                              ("FPGM_train.py", "fpgm"), ("Taylor_train.py", "taylor")])
def test_mask_scripts_save_zeroed_checkpoints(synthetic_market, tmp_path, script, criterion):
    extra = {"bafd": ["--efficient_pruning", "--max_lrate", "0.9"], "taylor": ["--taylor_batches", "2"]}.get(criterion,
                                                                                                           [])
    res = run_script(script, "--data_dir", synthetic_market / "pytorch", "--results_dir", tmp_path, "--name", "run",
                     "--save_epoch", "1", *COMMON, *extra)
    assert res.returncode == 0, res.stderr
    assert "pruned" in res.stdout and "MACs" in res.stdout and "remaining" in res.stdout
    out = tmp_path / "ft_resnet18" / "run"
    hook_state = torch.load(out / "resume.pth", weights_only=True)["hook"]
    assert hook_state["criterion"] == criterion
    rates = hook_state["rates"]
    for ckpt in ["net_1.pth", "net_2.pth", "net_last.pth"]:
        state = torch.load(out / ckpt, weights_only=True)
        zeros = zero_filters_per_layer(state, rates)
        assert all(zeros[n] >= int(state[n].shape[0] * rates[n]) for n in rates), ckpt
    if criterion == "bafd":
        # the running model after epoch 1 is only decayed (soft), while net_1.pth is hard-zeroed
        model_after_1 = torch.load(out / "net_1.pth", weights_only=True)
        assert any(zero_filters_per_layer(model_after_1, rates).values())
        loaded = model_from_state_dict(torch.load(out / "net_last.pth", weights_only=True))
        assert loaded.arch == "resnet18"


def test_hfp_trains_a_physically_smaller_network_loadable_by_test_py(synthetic_market, tmp_path):
    res = run_script("L1_train.py", "--data_dir", synthetic_market / "pytorch", "--results_dir", tmp_path,
                     "--name", "hfp", *COMMON)
    assert res.returncode == 0, res.stderr
    state = torch.load(tmp_path / "ft_resnet18" / "hfp" / "net_last.pth", weights_only=True)
    assert state["model.layer1.0.conv1.weight"].shape[0] == 64 - int(64 * 0.5)
    test = run_script("test.py", "--name", "hfp", "--results_dir", tmp_path, "--test_dir", synthetic_market / "pytorch",
                      "--workers", "0", "--mat", tmp_path / "r.mat")
    assert test.returncode == 0, test.stderr


def test_bafd_epoch_end_decays_then_hard_zeroes_at_the_last_epoch():
    torch.manual_seed(0)
    from model import ft_net
    net = ft_net(4, "resnet18")
    args = APFP_train.get_args_parser().parse_args(["--network_arch", "resnet18", "--prune_rate", "0.5",
                                                    "--height", "64", "--width", "32"])
    hook = hooks.bafd_hook(net, args)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    hook.on_epoch_end(net, 1, last=False)
    name = max(hook.mask.rates, key=hook.mask.rates.get)
    idx = hook.mask.selected[name]
    assert len(idx) == int(before[name].shape[0] * hook.mask.rates[name]) > 0
    assert torch.equal(net.state_dict()[name][idx], before[name][idx] * 0.3)
    saved = hook.weights_to_save(net, 1, last=False)
    assert (saved[name].flatten(1).abs().sum(1) == 0).sum() == len(idx)
    assert not torch.equal(saved[name], net.state_dict()[name])  # the model itself stays soft
    hook.on_epoch_end(net, 2, last=True)
    assert (net.state_dict()[name].flatten(1).abs().sum(1) == 0).sum() == len(hook.mask.selected[name])


class CrashAt2(hooks.MaskHook):
    def on_epoch_end(self, net, epoch, last):
        if epoch == 2:
            raise KeyboardInterrupt
        return super().on_epoch_end(net, epoch, last)


def test_bafd_resume_reproduces_masks_and_weights(synthetic_market, tmp_path):
    """Also the training loop's own resume (model, optimiser, scheduler, RNG, log, checkpoints)."""
    argv = ["--data_dir", str(synthetic_market / "pytorch"), *COMMON, "--Epochs", "2", "--name", "r", "--knn", "2",
            "--save_epoch", "1"]
    parser = APFP_train.get_args_parser()
    full = train_loop.train(parser.parse_args(argv + ["--results_dir", str(tmp_path / "a")]), hooks.bafd_hook)

    def crashing(net, args):
        hook = hooks.bafd_hook(net, args)
        return CrashAt2(hook.mask, hook.decay, hook.meter)

    with pytest.raises(KeyboardInterrupt):
        train_loop.train(parser.parse_args(argv + ["--results_dir", str(tmp_path / "b")]), crashing)
    resumed = train_loop.train(parser.parse_args(argv + ["--results_dir", str(tmp_path / "b"), "--resume"]),
                               hooks.bafd_hook)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k
    masks = [torch.load(tmp_path / d / "ft_resnet18" / "r" / "resume.pth", weights_only=True)["hook"]
             for d in ("a", "b")]
    assert masks[0]["rates"] == masks[1]["rates"]
    assert all(torch.equal(masks[0]["selected"][k], masks[1]["selected"][k]) for k in masks[0]["selected"])
    run = tmp_path / "b" / "ft_resnet18" / "r"
    assert [line.split(",")[0] for line in (run / "log.csv").read_text().splitlines()[1:]] == ["1", "2"]
    assert sorted(p.name for p in run.glob("net_*.pth")) == ["net_1.pth", "net_2.pth", "net_last.pth"]


def test_bad_arguments_are_one_line_errors(synthetic_market, tmp_path):
    res = run_script("APFP_train.py", "--data_dir", synthetic_market / "pytorch", "--results_dir", tmp_path,
                     *COMMON, "--max_lrate", "1.5")
    assert res.returncode == 2 and "--max_lrate" in res.stderr and "Traceback" not in res.stderr
    res = run_script("SFP_train.py", "--data_dir", tmp_path / "missing", "--results_dir", tmp_path, *COMMON)
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = run_script("FPGM_train.py", "--data_dir", synthetic_market / "pytorch", "--results_dir", tmp_path,
                     *COMMON, "--network_arch", "resnet101")
    assert res.returncode == 2 and "unknown arch" in res.stderr
    assert pruner.PruneError in hooks.USER_ERRORS
