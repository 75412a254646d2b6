"""The small model: exactness against the zeroed model, reload, ONNX, independent cost counts, errors."""
import numpy as np
import pytest
import scipy.io
import torch
from conftest import run_script

import pruner
import runtime_comparison
from model import ft_net, inference_params
from toolkit import utils
from toolkit.surgery import (
    conv_output_sizes,
    kept_filters,
    make_small_model,
    max_feature_difference,
    pruned_cost,
    small_model_from_state_dict,
    zero_filters,
)

SIZE = (64, 32)


def random_bn(net):
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)


def random_zeroed(arch: str, seed: int) -> torch.nn.Module:
    """ft_net with random BN statistics and random filters zeroed per layer: one layer keeps a single
    filter, one loses all of them, others random counts (zero included)."""
    torch.manual_seed(seed)
    net = ft_net(7, arch).eval()
    random_bn(net)
    layers = pruner.pruned_convs(arch)
    pruned = {}
    for i, layer in enumerate(layers):
        n = net.get_submodule(layer.conv).out_channels
        count = n - 1 if i == 1 else n if i == 2 else int(torch.randint(0, n, (1,)))
        pruned[layer.weight] = torch.randperm(n)[:count]
    pruner.FilterMask(arch, {}, "l2").apply(net, 0.0, pruned)
    return net


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("seed", [0, 1])
def test_small_equals_zeroed(arch, seed):
    net = random_zeroed(arch, seed)
    small = make_small_model(net)
    assert max_feature_difference(net, small, SIZE) < 1e-5
    assert inference_params(small) < inference_params(net)
    widths = [small.get_submodule(layer.conv).out_channels for layer in pruner.pruned_convs(arch)]
    assert 1 in widths  # the layer that kept one filter, and the one that lost all (one zero filter kept)
    # reload from its own state dict, without the original
    reloaded = small_model_from_state_dict(small.state_dict())
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(reloaded.eval().extract(x), small.eval().extract(x))


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_deploy_form_computes_the_same_features_with_aligned_widths(arch):
    net = random_zeroed(arch, 4)
    small = make_small_model(net)
    from toolkit.surgery import PrunedBlock, expand_small_model, make_deploy_model
    expanded = expand_small_model(small).eval()
    assert type(expanded) is type(net) and max_feature_difference(net, expanded, SIZE) < 1e-5
    deploy, again = make_deploy_model(net), make_deploy_model(small)
    for form in (deploy, again):
        assert max_feature_difference(net, form, SIZE) < 1e-5
    assert deploy.state_dict().keys() == again.state_dict().keys()
    for layer in pruner.pruned_convs(arch):
        full_width = net.get_submodule(layer.conv).out_channels
        kept = small.get_submodule(layer.conv).out_channels
        width = deploy.get_submodule(layer.conv).out_channels
        if layer.is_block_output and arch == "resnet50":
            assert width == full_width  # dense bottleneck output: a plain residual add, no scatter
        else:
            assert width == min(full_width, -(-kept // 8) * 8), layer.conv
    if arch == "resnet50":
        blocks = [m for m in deploy.modules() if isinstance(m, PrunedBlock)]
        assert all(torch.equal(b.out_index, torch.arange(b.width)) for b in blocks)
    assert max_feature_difference(deploy, small_model_from_state_dict(deploy.state_dict()), SIZE) == 0.0


def test_small_model_trains():
    small = make_small_model(random_zeroed("resnet18", 3)).train()
    _, f = small(torch.randn(4, 3, *SIZE))
    f.sum().backward()
    assert small.model.layer1[0].conv1.weight.grad is not None


def independent_r18_cost(kept: dict, size) -> tuple[int, int]:
    """ResNet-18 params/MACs written out by hand from the kept filter numbers."""
    h, w = (size[0] + 1) // 2, (size[1] + 1) // 2  # stem conv, stride 2
    params, macs = 64 * 3 * 49 + 2 * 64, 64 * 3 * 49 * h * w
    h, w = (h + 1) // 2, (w + 1) // 2  # max pool
    cin = 64
    for li, cout in enumerate([64, 128, 256, 512], 1):
        for bi in range(2):
            stride = 2 if li > 1 and bi == 0 else 1
            h, w = (h + stride - 1) // stride, (w + stride - 1) // stride
            k1, k2 = kept[f"model.layer{li}.{bi}.conv1.weight"], kept[f"model.layer{li}.{bi}.conv2.weight"]
            params += k1 * cin * 9 + 2 * k1 + k2 * k1 * 9 + 2 * k2
            macs += (k1 * cin * 9 + k2 * k1 * 9) * h * w
            if stride == 2 or cin != cout:
                params += cout * cin + 2 * cout
                macs += cout * cin * h * w
            cin = cout
    return params + 2 * 512, macs  # + the BN neck


def test_cost_counts_match_an_independent_count():
    net = random_zeroed("resnet18", 4)
    small = make_small_model(net)
    kept = {k: len(v) for k, v in kept_filters(net, "resnet18", zero_filters(net, "resnet18")).items()}
    expected = independent_r18_cost(kept, SIZE)
    assert (inference_params(small), utils.count_macs(small, SIZE)) == expected
    assert pruned_cost(net, kept, conv_output_sizes(net, SIZE)) == expected
    net50 = random_zeroed("resnet50", 5)
    kept50 = {k: len(v) for k, v in kept_filters(net50, "resnet50", zero_filters(net50, "resnet50")).items()}
    small50 = make_small_model(net50)
    assert pruned_cost(net50, kept50, conv_output_sizes(net50, SIZE)) == (
        inference_params(small50), utils.count_macs(small50, SIZE))


def test_onnx_export_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    pytest.importorskip("onnxscript", reason="onnxscript (needed by torch's ONNX exporter) is not installed")
    from toolkit import onnx_export
    small = make_small_model(random_zeroed("resnet18", 6))
    path = onnx_export.export_onnx(small, tmp_path / "small.onnx", SIZE)
    assert onnx_export.onnx_max_difference(small, path, SIZE) < 1e-4
    import onnx
    assert onnx.load(str(path)).opset_import[0].version >= 17


@pytest.fixture()
def zeroed_run(tmp_path):
    run = tmp_path / "ft_resnet18" / "z"
    run.mkdir(parents=True)
    net = random_zeroed("resnet18", 7)
    torch.save(net.state_dict(), run / "net_last.pth")
    utils.save_options({"height": SIZE[0], "width": SIZE[1]}, run / "opts.yaml")
    return tmp_path, net


def test_script_writes_the_same_features_as_test_py(zeroed_run, synthetic_market):
    root, _ = zeroed_run
    common = ["--name", "z", "--results_dir", root, "--test_dir", synthetic_market / "pytorch", "--workers", "0"]
    small = run_script("test_small.py", *common, "--NonL1", "--mat", root / "small.mat")
    assert small.returncode == 0, small.stderr
    assert "fewer MACs" in small.stdout and (root / "ft_resnet18" / "z" / "net_last_small.pth").is_file()
    full = run_script("test.py", *common, "--mat", root / "zeroed.mat")
    assert full.returncode == 0, full.stderr
    a, b = scipy.io.loadmat(root / "small.mat"), scipy.io.loadmat(root / "zeroed.mat")
    assert np.abs(a["query_f"] - b["query_f"]).max() < 1e-5
    assert np.array_equal(a["gallery_label"], b["gallery_label"])
    # the saved small model loads with torch.load + one function and is picked up by test.py too
    state = torch.load(root / "ft_resnet18" / "z" / "net_last_small.pth", weights_only=True)
    assert small_model_from_state_dict(state).arch == "resnet18"


def test_script_errors(zeroed_run, tmp_path):
    root, _ = zeroed_run
    mismatch = run_script("test_small.py", "--name", "z", "--results_dir", root, "--NonL1", "--network_arch",
                          "resnet50", "--no_features")
    assert mismatch.returncode == 2 and "does not match" in mismatch.stderr
    dense = tmp_path / "ft_resnet18" / "dense"
    dense.mkdir(parents=True)
    torch.save(ft_net(7, "resnet18").state_dict(), dense / "net_last.pth")
    none = run_script("test_small.py", "--name", "dense", "--results_dir", tmp_path, "--NonL1", "--no_features")
    assert none.returncode == 2 and "no zero filters" in none.stderr
    hfp = run_script("test_small.py", "--name", "dense", "--results_dir", tmp_path, "--prune_rate", "0.5",
                     "--no_features", "--height", "64", "--width", "32")
    assert hfp.returncode == 0, hfp.stderr
    state = torch.load(dense / "net_last_small.pth", weights_only=True)
    assert state["model.layer1.0.conv1.weight"].shape[0] == 32


def test_runtime_comparison_writes_its_table(zeroed_run):
    root, _ = zeroed_run
    res = run_script("runtime_comparison.py", "--name", "z", "--results_dir", root, "--NonL1", "--height", "64",
                     "--width", "32", "--repeats", "2", "--warmup", "1", "--batch_sizes", "1,2", "--no_onnx")
    assert res.returncode == 0, res.stderr
    import json
    rows = json.loads((root / "ft_resnet18" / "z" / "runtime_last_cpu.json").read_text())
    assert [r["model"] for r in rows] == ["full", "zeroed", "small", "small deploy"]
    assert rows[2]["mac_ratio"] > 1 and rows[0]["speedup_b1"] == 1 and rows[0]["speedup_b2"] == 1
    assert "MAC ratio" in res.stdout
    bad = run_script("runtime_comparison.py", "--name", "z", "--results_dir", root, "--NonL1", "--no_onnx", "--int8")
    assert bad.returncode == 2 and "--int8 needs the ONNX Runtime rows" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.skipif(not runtime_comparison.onnx_available(), reason="onnxruntime/onnxscript not installed")
def test_runtime_comparison_int8_row_and_accuracy(zeroed_run, synthetic_market):
    root, _ = zeroed_run
    res = run_script("runtime_comparison.py", "--name", "z", "--results_dir", root, "--NonL1", "--height", "64",
                     "--width", "32", "--repeats", "2", "--warmup", "1", "--batch_sizes", "1", "--int8",
                     "--calib_dir", synthetic_market / "pytorch", "--calib_images", "16",
                     "--test_dir", synthetic_market / "pytorch",
                     "--onnx_exporter", "legacy")  # the dynamo exporter has its own test; this one checks the rows
    assert res.returncode == 0, res.stderr
    import json
    run = root / "ft_resnet18" / "z"
    rows = {r["model"]: r for r in json.loads((run / "runtime_last_cpu.json").read_text())}
    assert list(rows) == ["full", "zeroed", "small", "small deploy", "full (onnxruntime)", "small (onnxruntime)",
                          "small deploy (onnxruntime)", "small deploy int8 (onnxruntime)"]
    same = [rows[m]["mAP"] for m in ("zeroed", "small", "small deploy", "small deploy (onnxruntime)")]
    assert max(same) - min(same) < 1e-6  # one network, four implementations
    assert (run / "net_last_small_int8.onnx").is_file()
    int8, fp32 = rows["small deploy int8 (onnxruntime)"], rows["small deploy (onnxruntime)"]
    assert fp32["size_mb"] / int8["size_mb"] >= 3 and 0 <= int8["mAP"] <= 1
    assert "size (MB)" in res.stdout and "mAP" in res.stdout
