"""The edge pipeline: shrinking a small model again, iterative compression, INT8 quantization."""
import json

import numpy as np
import pytest
import torch

import iterative_compress
import model as model_lib
import pruner
import quantize
import runtime_comparison
from model import ft_net
from toolkit import surgery
from toolkit.surgery import make_small_model, max_feature_difference, small_model_from_state_dict

needs_onnx = pytest.mark.skipif(not runtime_comparison.onnx_available(),
                                reason="onnxruntime/onnxscript not installed: INT8 export cannot run")


def random_kept(net, gen, keep_fraction):
    """Random surviving filters per pruned conv (at least one each)."""
    modules = dict(net.named_modules())
    kept = {}
    for layer in pruner.pruned_convs(net.arch):
        n = modules[layer.conv].out_channels
        k = max(1, int(n * keep_fraction))
        kept[layer.weight] = torch.sort(torch.randperm(n, generator=gen)[:k]).values
    return kept


def settle_bn(net, size, images=None):
    """BN running statistics from `images` (default: random ones), as a trained model would have them."""
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    images = torch.randn(24, 3, *size) if images is None else images
    net.train()
    with torch.no_grad():
        for batch in images.split(8):
            net.extract(batch)
    return net.eval()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_shrinking_a_small_model_again_equals_zeroing_both_rounds(arch):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = settle_bn(ft_net(5, arch), (64, 32))
    kept1 = random_kept(net, gen, 0.6)
    first = make_small_model(net, kept1)
    kept2 = random_kept(first, gen, 0.5)
    second = make_small_model(first, kept2)
    # the same filters zeroed in the full network: round-2 survivors mapped back to full indices
    zeroed = ft_net(5, arch)
    zeroed.load_state_dict(net.state_dict())
    zeroed.eval()
    params = dict(zeroed.named_parameters())
    for layer in pruner.pruned_convs(arch):
        full_kept = kept1[layer.weight][kept2[layer.weight]]
        drop = torch.ones(params[layer.weight].shape[0], dtype=torch.bool)
        drop[full_kept] = False
        with torch.no_grad():
            for key in layer.filter_params:
                params[key][drop] = 0
    assert max_feature_difference(zeroed, second, (64, 32)) < 1e-5
    assert model_lib.inference_params(second) < model_lib.inference_params(first) < model_lib.inference_params(net)
    reloaded = small_model_from_state_dict(second.state_dict())
    assert max_feature_difference(second, reloaded, (64, 32)) == 0.0


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory, synthetic_market):
    """An untrained ResNet-18 whose BN statistics come from the training images (as after training)."""
    torch.manual_seed(1)
    net = ft_net(6, "resnet18")
    images = torch.from_numpy(np.concatenate(quantize.calibration_batches(
        [synthetic_market / "pytorch" / "train_all"], 48, (64, 32))))
    settle_bn(net, (64, 32), images=images)
    path = tmp_path_factory.mktemp("start") / "net_last.pth"
    torch.save(net.state_dict(), path)
    return path


def pipeline_args(parser, synthetic_market, *extra):
    return parser.parse_args(["--data_dir", str(synthetic_market / "pytorch"), "--train_all", "--height", "64",
                              "--width", "32", "--workers", "0", "--batchsize", "8", "--Epochs", "1", *extra])


def test_one_iterative_round_gives_a_smaller_loadable_trainable_model(synthetic_market, start_checkpoint, tmp_path):
    out = tmp_path / "iter"
    args = pipeline_args(iterative_compress.get_args_parser(), synthetic_market, "--checkpoint", str(start_checkpoint),
                         "--out", str(out), "--rounds", "1", "--criterion", "fpgm", "--prune_rate", "0.5",
                         "--loss", "softmax+circle")
    rounds = iterative_compress.main(args)
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[1]["params"] < 0.5 * rounds[0]["params"] and rounds[1]["macs"] < rounds[0]["macs"]
    assert json.loads((out / "metrics.json").read_text()) == rounds
    state = torch.load(out / "round_1" / "net_last.pth", weights_only=True)
    small = surgery.model_from_state_dict(state)  # self-describing: no other file needed
    assert model_lib.inference_params(small) == rounds[1]["params"]
    # trainable: one SGD step on a softmax loss changes the weights and keeps the loss finite
    small.train()
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    before = small.model.layer1[0].conv1.weight.detach().clone()
    logits, _ = small(torch.randn(4, 3, 64, 32))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, small.model.layer1[0].conv1.weight)
    # --resume carries on after the finished round
    args.rounds, args.resume = 2, True
    resumed = iterative_compress.main(args)
    assert [r["round"] for r in resumed] == [0, 1, 2] and resumed[2]["params"] < resumed[1]["params"]


def test_weight_fake_quant_is_the_per_channel_int8_grid_with_straight_through_gradient():
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(2)).requires_grad_()
    q = quantize.WeightFakeQuant()(w)
    scale = w.detach().flatten(1).abs().amax(1) / 127
    levels = q.detach() / scale[:, None, None, None]
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= 127 + 1e-4
    assert torch.allclose(q.detach().flatten(1).abs().amax(1), w.detach().flatten(1).abs().amax(1))
    assert (q - w).abs().max() <= scale.max() / 2 + 1e-6
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_input_fake_quant_tracks_the_range_and_freezes_it_in_eval():
    fq = quantize.InputFakeQuant(momentum=0.5)
    fq(torch.tensor([0.5, 2.0]))  # first batch sets the range: [0, 2]
    fq(torch.tensor([-1.0, 4.0]))  # then a moving average: lo -0.5, hi 3
    assert fq.lo.item() == pytest.approx(-0.5) and fq.hi.item() == pytest.approx(3.0)
    fq.eval()
    y = fq(torch.tensor([-10.0, 0.0, 1.0, 10.0]))
    scale = 3.5 / 255
    assert y[0].item() == pytest.approx(-0.5, abs=scale) and y[3].item() == pytest.approx(3.0, abs=scale)
    assert y[1].item() == 0.0 and y[2].item() == pytest.approx(1.0, abs=scale / 2 + 1e-6)
    assert fq.lo.item() == pytest.approx(-0.5)  # unchanged in eval


def test_qat_model_saves_plain_weights():
    torch.manual_seed(3)
    net = settle_bn(ft_net(4, "resnet18"), (64, 32))
    small = make_small_model(net, random_kept(net, torch.Generator().manual_seed(3), 0.5))
    qat = quantize.prepare_qat(small_model_from_state_dict(small.state_dict()))
    plain = surgery.model_from_state_dict(quantize.float_state_dict(qat))
    assert set(plain.state_dict()) == set(small.state_dict())
    assert max_feature_difference(small, plain, (64, 32)) == 0.0
    # once the input ranges are observed, fake quantization changes the features only slightly
    a, b = small.eval(), qat.eval()
    x = torch.randn(4, 3, 64, 32)
    with torch.no_grad():
        for m in qat.modules():
            if isinstance(m, quantize.InputFakeQuant):
                m.train()
        qat.extract(x)
        qat.eval()
        cos = torch.nn.functional.cosine_similarity(a.extract(x), b.extract(x))
    assert cos.min() > 0.95 and cos.min() < 1.0


@needs_onnx
def test_int8_model_is_close_to_float_and_much_smaller(synthetic_market, trained_resnet18, tmp_path):
    """Quantization error judged on the features of a trained network."""
    out = tmp_path / "int8"
    args = quantize.get_args_parser().parse_args(
        ["--checkpoint", str(trained_resnet18), "--out", str(out), "--data_dir", str(synthetic_market / "pytorch"),
         "--train_all", "--height", "96", "--width", "48", "--workers", "0", "--batchsize", "8", "--Epochs", "1",
         "--calib_images", "48", "--repeats", "3", "--onnx_exporter", "legacy"])
    rows = quantize.main(args)
    names = [r["model"] for r in rows]
    assert names == ["small fp32 (onnxruntime)", "small int8 PTQ (onnxruntime)", "small int8 QAT (onnxruntime)"]
    fp32 = rows[0]["size_mb"]
    assert all(fp32 / r["size_mb"] >= 3 for r in rows[1:])
    assert all(0 <= r["mAP"] <= 1 and 0 <= r["R1"] <= 1 for r in rows)
    assert rows[1]["mAP"] > rows[0]["mAP"] - 0.1  # INT8 keeps the accuracy
    images = np.concatenate(quantize.calibration_batches([synthetic_market / "pytorch" / "gallery"], 32, (96, 48),
                                                         seed=9))
    from toolkit.onnx_export import onnx_session
    for a, b in (("fp32", "int8_ptq"), ("qat_fp32", "int8_qat")):
        cos = quantize.cosine_similarity(onnx_session(out / f"{a}.onnx"), onnx_session(out / f"{b}.onnx"), images)
        assert cos.mean() >= 0.98 and cos.min() >= 0.9, (b, cos.mean(), cos.min())
    table = (out / "quantization.csv").read_text()
    assert "size_mb" in table and "mAP" in table and "ms_b1" in table


def test_fit_classifier_replaces_the_head_only_when_the_class_count_differs():
    from toolkit import train_loop
    net = ft_net(4, "resnet18")
    backbone = net.model.conv1.weight.detach().clone()
    head = net.classifier.classifier[0]
    assert train_loop.fit_classifier(net, 4).classifier.classifier[0] is head
    train_loop.fit_classifier(net, 9)
    new = net.classifier.classifier[0]
    assert new is not head and new.out_features == 9 and new.in_features == head.in_features
    assert torch.equal(new.bias, torch.zeros(9)) and new.weight.std() < 0.01
    assert torch.equal(net.model.conv1.weight, backbone)


@needs_onnx
def test_quantizing_without_calibration_images_is_a_clear_error(tmp_path):
    with pytest.raises(quantize.QuantizationError, match="no calibration images"):
        quantize.quantize_onnx(tmp_path / "in.onnx", tmp_path / "out.onnx", [])
