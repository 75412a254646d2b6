"""SFP on classification: the paper's FLOPs formula, masks, exact small models, data, training, scripts."""
import importlib
import os
import pickle
import shlex
import subprocess

import numpy as np
import pytest
import torch
from conftest import ROOT

from classification import data as cdata
from classification import engine, flops
from classification.models import build_model, conv_units
from classification.sfp import SoftFilterMask, n_pruned, pruned_layers
from classification.small import (
    ScatterChannels,
    has_constants,
    inner_only,
    load_small,
    make_small_model,
    small_checkpoint,
    zero_filters,
)

LAYER_END = {"resnet20": 54, "resnet32": 90, "resnet56": 162, "resnet110": 324, "resnet18": 57, "resnet34": 105,
             "resnet50": 156, "resnet101": 309, "resnet152": 462}


@pytest.mark.parametrize("depth, baseline_m, reduction_07", [(20, 40.55, 42.2), (32, 68.86, 41.5),
                                                             (56, 125.49, 41.1), (110, 252.89, 40.8)])
def test_paper_formula_reproduces_the_published_flops(depth, baseline_m, reduction_07):
    assert round(flops.paper_cifar_macs(depth, 1) / 1e6, 2) == baseline_m
    assert round(100 * flops.paper_reduction(f"resnet{depth}", 0.7), 1) == reduction_07


def test_paper_formula_resnet56_at_keep_06():
    assert round(100 * flops.paper_reduction("resnet56", 0.6), 1) == 52.6
    assert flops.paper_reduction("resnet50", 0.7) is None  # the formula is CIFAR's


def integer_channel_macs(depth: int, rate: float) -> int:
    """The small CIFAR model's MACs written out: kept = C - int(C (1 - rate)) of every conv. The residual
    stream stays full width; only the first block reads the stem's kept channels (its pruned ones are
    constants), and the classifier reads all 64."""
    kept = lambda c: c - int(c * (1 - rate))  # noqa: E731
    n = (depth - 2) // 6
    macs = 3 * kept(16) * 9 * 32 * 32
    c_in = 16
    for stage, (width, size) in enumerate(zip((16, 32, 64), (32, 16, 8))):
        for block in range(n):
            first_in = kept(16) if stage == 0 and block == 0 else c_in
            macs += first_in * kept(width) * 9 * size * size + kept(width) * kept(width) * 9 * size * size
            c_in = width
    return macs + 64 * 10


def randomize_bn(net: torch.nn.Module, seed: int = 0) -> None:
    """BN statistics and affine parameters far from 1/0, so that pruned channels' constants are not zero."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)


def pruned_net(arch: str, rate: float, prune_bn: bool, skip_downsample: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    net = build_model(arch, 10)
    randomize_bn(net, seed)
    layers = pruned_layers(net, 0, LAYER_END[arch], 3, skip_downsample)
    SoftFilterMask(layers, rate, prune_bn).step(net)
    return net.eval(), layers


@pytest.mark.parametrize("depth", [20, 32, 56, 110])
def test_flop_counter_on_small_cifar_models_equals_the_written_out_count(depth):
    net, layers = pruned_net(f"resnet{depth}", 0.7, prune_bn=False)
    small = make_small_model(net, zero_filters(net, layers), True)
    assert flops.macs(small, 32) == integer_channel_macs(depth, 0.7)
    assert flops.macs(net, 32) == integer_channel_macs(depth, 1.0)
    if depth == 56:
        assert round(100 * (1 - flops.macs(small, 32) / flops.macs(net, 32)), 1) == 38.0


def test_layer_indices_translate_to_every_conv_and_skip_downsample():
    cifar = build_model("resnet20", 10)
    layers = pruned_layers(cifar, 0, 54, 3)
    assert layers[0] == "conv1" and layers[-1] == "layer3.2.conv2" and len(layers) == 19  # stem + 18 block convs
    r18 = build_model("resnet18", 10)
    with_ds = pruned_layers(r18, 0, 57, 3, skip_downsample=False)
    without = pruned_layers(r18, 0, 57, 3, skip_downsample=True)
    assert sum(".downsample." in n for n in with_ds) == 3 and not any(".downsample." in n for n in without)
    assert "fc" not in " ".join(with_ds)
    with pytest.raises(engine.ModelError, match="parameter index 1 is bn1.weight, not a conv weight"):
        pruned_layers(cifar, 0, 54, 1)
    with pytest.raises(engine.ModelError, match="parameter index 57 is fc.weight"):
        pruned_layers(cifar, 0, 57, 3)
    with pytest.raises(engine.ModelError, match="only 59 parameters"):
        pruned_layers(cifar, 60, 60, 3)


def test_masks_zero_the_smallest_l2_filters_and_keep_bn_unless_asked():
    torch.manual_seed(0)
    net = build_model("resnet20", 10)
    randomize_bn(net)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    layers = pruned_layers(net, 0, 54, 3)
    selected = SoftFilterMask(layers, 0.7).step(net)
    assert [n_pruned(c, 0.7) for c in (16, 32, 64)] == [4, 9, 19]
    for name in layers:
        w = before[f"{name}.weight"]
        norms = w.flatten(1).double().norm(dim=1)
        expected = torch.sort(torch.argsort(norms, stable=True)[:n_pruned(len(w), 0.7)]).values
        assert torch.equal(selected[name], expected), name
        zero = net.get_submodule(name).weight.flatten(1).abs().sum(1) == 0
        assert int(zero.sum()) == n_pruned(len(w), 0.7)
    assert torch.equal(net.bn1.weight, before["bn1.weight"])  # BN untouched by default
    assert torch.equal(net.fc.weight, before["fc.weight"])  # never the classifier
    with_bn = build_model("resnet20", 10)
    chosen = SoftFilterMask(["conv1"], 0.7, prune_bn=True).step(with_bn)["conv1"]
    assert torch.all(with_bn.bn1.weight[chosen] == 0) and torch.all(with_bn.bn1.bias[chosen] == 0)


def test_ties_prune_the_lowest_index_first():
    net = build_model("resnet20", 10)
    with torch.no_grad():
        net.conv1.weight.fill_(1.0)  # 16 identical filters
    assert SoftFilterMask(["conv1"], 0.7).select(net)["conv1"].tolist() == [0, 1, 2, 3]


def test_soft_pruning_pruned_filters_get_gradients_and_can_come_back():
    torch.manual_seed(0)
    net = build_model("resnet20", 10)
    with torch.no_grad():  # as after training: a positive BN bias lets the gradient through the ReLU
        net.layer1[0].bn1.bias.fill_(0.5)
    mask = SoftFilterMask(pruned_layers(net, 0, 54, 3), 0.7)
    first = mask.step(net)["layer1.0.conv1"]
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(net(x), y).backward()
    grad = net.layer1[0].conv1.weight.grad
    assert grad[first].abs().sum() > 0  # no gradient masking
    opt.step()
    assert net.layer1[0].conv1.weight[first].abs().sum() > 0  # the zeroed filters moved again


CASES = [(a, bn) for a in ("resnet20", "resnet32", "resnet56", "resnet110", "resnet18", "resnet34", "resnet50")
         for bn in (False, True)]


@pytest.mark.parametrize("arch, prune_bn", CASES)
def test_small_model_equals_the_model_with_zeros(arch, prune_bn):
    net, layers = pruned_net(arch, 0.7, prune_bn, skip_downsample=arch != "resnet18", seed=len(arch))
    pruned = zero_filters(net, layers)
    with_constants = has_constants(net, pruned)
    assert with_constants != prune_bn  # SFP's default leaves non-zero BN constants
    small = make_small_model(net, pruned, with_constants).eval()
    size = 32 if arch in ("resnet20", "resnet32", "resnet56", "resnet110") else 48
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, got = net(x), small(x)
    assert (got - full).abs().max() <= 1e-5 * max(1.0, float(full.abs().max()))
    assert flops.params(small) < flops.params(net)
    if arch in ("resnet20", "resnet50"):  # the deployment form: inner convs only, no channel scatter
        deploy = make_small_model(net, inner_only(net, pruned), with_constants).eval()
        with torch.no_grad():
            assert (deploy(x) - full).abs().max() <= 1e-5 * max(1.0, float(full.abs().max()))
        assert not any(isinstance(m, ScatterChannels) for m in deploy.modules())
        assert flops.macs(small, size) < flops.macs(deploy, size) < flops.macs(net, size)
    if arch == "resnet20":  # loads from its own checkpoint, without the full one
        ckpt = small_checkpoint(arch, 10, net, small, pruned, with_constants)
        with torch.no_grad():
            assert torch.equal(load_small(ckpt).eval()(x), got)
        assert set(ckpt) == {"arch", "num_classes", "kept", "with_constants", "state_dict"}


def test_cifar_reader_reads_the_real_pickle_format_and_refuses_objects(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    for name in [*cdata.CIFAR_TRAIN, "test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": [0, 1, 2, 3, 4, 9],
                                                  b"filenames": [b"x"] * 6}, protocol=2))
    ds = cdata.Cifar10(tmp_path, False, cdata.cifar_transforms(False))
    assert len(ds) == 6 and ds.targets.tolist() == [0, 1, 2, 3, 4, 9]
    # R plane, then G, then B: pixel (0, 0) of image 0 is (data[0], data[1024], data[2048])
    assert ds.images[0, 0, 0].tolist() == [data[0, 0], data[0, 1024], data[0, 2048]]
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": os.system}, protocol=2))
    with pytest.raises(cdata.DatasetError, match="not part of a CIFAR batch"):
        cdata.Cifar10(tmp_path, False, cdata.cifar_transforms(False))


def test_global_batches_of_two_ranks_equal_one_process_with_double_batch():
    one = list(cdata.GlobalBatchSampler(50, 8, True, seed=3, rank=0, world=1))
    ranks = [list(cdata.GlobalBatchSampler(50, 4, True, seed=3, rank=r, world=2)) for r in (0, 1)]
    for step in range(len(one) // 8):
        assert sorted(one[8 * step: 8 * step + 8]) == sorted(ranks[0][4 * step: 4 * step + 4]
                                                            + ranks[1][4 * step: 4 * step + 4])
    shards = [list(cdata.GlobalBatchSampler(11, 4, False, rank=r, world=3)) for r in range(3)]
    assert sum(shards, []) == list(range(11))


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    """A 2-epoch SFP ResNet-20 run on the synthetic CIFAR-10, and a copy stopped after epoch 1 then resumed."""
    from classification import pruning_cifar10_resnet as script
    from classification.synthetic import write_cifar10
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root / "data", per_class=30, seed=0)
    argv = [str(root / "data"), "--arch", "resnet20", "--epochs", "2", "--schedule", "1", "--gammas", "1",
            "--learning_rate", "0.05", "--batch_size", "16", "--rate", "0.7", "--layer_begin", "0", "--layer_end",
            "54", "--layer_inter", "3", "--workers", "0"]
    parser = script.get_args_parser()
    full = script.main(parser.parse_args([*argv, "--save_path", str(root / "full")]))
    first = parser.parse_args([*argv, "--save_path", str(root / "half"), "--epochs", "1"])
    script.main(first)
    resumed = script.main(parser.parse_args([*argv, "--save_path", str(root / "half"), "--resume",
                                             str(root / "half" / "checkpoint.pth")]))
    return root, full, resumed


def test_two_epoch_cifar_run_beats_chance_and_resume_equals_uninterrupted(cifar_run):
    root, full, resumed = cifar_run
    assert full["top1_last"] > 20 and full["top1_best"] >= full["top1_last"]  # chance is 10 %
    assert round(100 * full["paper_reduction"], 1) == 42.2 and full["real_reduction"] > 0.3
    a = torch.load(root / "full" / "checkpoint.pth", weights_only=True)
    b = torch.load(root / "half" / "checkpoint.pth", weights_only=True)
    for (name, x), y in zip(a["state_dict"].items(), b["state_dict"].values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-5), name
    assert full["top1_last"] == resumed["top1_last"]
    zeros = zero_filters_in_checkpoint(a)
    assert zeros["conv1"] == 4 and zeros["layer3.2.conv2"] == 19  # masked at the last epoch


def zero_filters_in_checkpoint(state: dict) -> dict[str, int]:
    return {name: int((state["state_dict"][f"{name}.weight"].flatten(1).abs().sum(1) == 0).sum())
            for name in state["layers"]}


def test_get_small_and_infer_small_give_the_same_accuracy(cifar_run):
    from classification import engine as eng
    from classification import get_small, infer_small
    root, full, _ = cifar_run
    out = get_small.main(get_small.get_args_parser().parse_args(
        ["--resume", str(root / "full" / "checkpoint.pth"), "--save_dir", str(root / "small")]))
    assert out["difference"] <= 1e-5 and out["small_macs"] < out["macs"]
    metrics = infer_small.main(infer_small.get_args_parser().parse_args(
        [str(root / "data"), "--small", str(root / "small" / "small.pth"), "--workers", "0"]))
    evaluated = eng.run(eng.Recipe(data=str(root / "data"), arch="resnet20", save_dir=str(root / "full"), epochs=2,
                                   batch_size=16, lr=0.1, momentum=0.9, weight_decay=0, nesterov=True, workers=0,
                                   seed=0, resume=str(root / "full" / "checkpoint.pth"), evaluate=True))
    assert metrics["top1"] == evaluated["top1"] == full["top1_last"]


SCRIPTS = ["cifar10_resnet.sh", "get_small.sh", "inference_resnet.sh", "infer_pruned.sh",
           *[f"train-resnet{d}-{k}.sh" for d in (18, 34, 50, 101) for k in ("original", "prune", "prune-pretrain")]]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_dry_run_command_parses_with_its_targets_own_parser(script):
    res = subprocess.run(["bash", str(ROOT / "classification" / "scripts" / script)],
                         env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    commands = [shlex.split(line) for line in res.stdout.splitlines() if line.strip()]
    assert commands
    for argv in commands:
        assert argv[:2] == ["python", "-m"] and argv[2].startswith("classification."), argv
        parser = importlib.import_module(argv[2]).get_args_parser()
        parser.exit = parser.error = lambda *a, **k: pytest.fail(f"{script}: {' '.join(argv)} -> {a}")
        args = parser.parse_args(argv[3:])
        if hasattr(args, "layer_end") and hasattr(args, "arch") and args.layer_end is not None:
            assert args.layer_end == LAYER_END[args.arch]


def test_units_table_knows_every_conv():
    for arch in ("resnet20", "resnet18", "resnet50"):
        net = build_model(arch, 10)
        units = {u.conv for u in conv_units(net)}
        convs = {n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)}
        assert units == convs, arch


def test_sfp_reference_imagenet_checkpoint_goes_through_get_small_exactly(tmp_path):
    """The SFP ImageNet code saves {epoch, arch, state_dict, best_prec1, optimizer} of a DataParallel model."""
    from classification import get_small
    torch.manual_seed(0)
    net = build_model("resnet18", 7)
    for m in net.modules():  # non-trivial BN statistics, so that the pruned channels' constants matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    layers = pruned_layers(net, 0, 57, 3)
    SoftFilterMask(layers, 0.7, False).step(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    SoftFilterMask(layers, 0.7, False).step(net)
    reference = {"epoch": 90, "arch": "resnet18", "best_prec1": 61.2, "optimizer": optimizer.state_dict(),
                 "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}
    torch.save(reference, tmp_path / "model_best.pth.tar")
    state = engine.load_checkpoint(tmp_path / "model_best.pth.tar")
    assert state["num_classes"] == 7 and sorted(state["layers"]) == sorted(layers)
    out = get_small.main(get_small.get_args_parser().parse_args(
        ["--resume", str(tmp_path / "model_best.pth.tar"), "--save_dir", str(tmp_path / "small")]))
    assert out["difference"] <= 1e-5 and out["small_macs"] < out["macs"]
    small = load_small(torch.load(tmp_path / "small" / "small.pth", weights_only=True)).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = net.eval()(x), small(x)
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5
    with pytest.raises(engine.TrainingError, match="SFP reference code"):
        engine.run(engine.Recipe(data=str(tmp_path), arch="resnet18", save_dir=str(tmp_path / "go"), epochs=1,
                                 batch_size=2, lr=0.1, momentum=0.9, weight_decay=0, nesterov=True, workers=0, seed=0,
                                 resume=str(tmp_path / "model_best.pth.tar")))


def test_sfp_cifar_whole_model_pickles_are_refused_in_one_line(tmp_path):
    """The SFP CIFAR code saves the model object itself: never unpickled, and torch's weights_only=False advice
    is not passed on."""
    torch.save({"epoch": 1, "arch": "resnet20", "state_dict": build_model("resnet20", 10), "recorder": None},
               tmp_path / "checkpoint.pth.tar")
    import model as reid_model
    with pytest.raises(reid_model.ModelError, match="pickles Python objects") as info:
        engine.load_checkpoint(tmp_path / "checkpoint.pth.tar")
    message = str(info.value).replace(str(tmp_path), "")
    assert "weights_only" not in message and "\n" not in message and len(message) < 200


def test_resume_must_continue_the_same_run_from_its_own_state(cifar_run, tmp_path):
    from classification import pruning_cifar10_resnet as script
    root, _, _ = cifar_run
    argv = [str(root / "data"), "--arch", "resnet20", "--epochs", "3", "--schedule", "1", "--gammas", "1",
            "--learning_rate", "0.05", "--batch_size", "16", "--rate", "0.7", "--layer_begin", "0", "--layer_end",
            "54", "--layer_inter", "3", "--workers", "0", "--save_path", str(root / "full")]
    parser = script.get_args_parser()
    before = (root / "full" / "checkpoint.pth").read_bytes()
    for change, words in ((["--rate", "0.5"], "rate is 0.5 but the run"),
                          (["--layer_end", "51"], "layer_end is 51 but the run"),
                          (["--resume", str(root / "full" / "model_best.pth")], "no optimiser or epoch state")):
        args = [*argv, "--resume", str(root / "full" / "checkpoint.pth"), *change]
        with pytest.raises(engine.TrainingError, match=words):
            script.main(parser.parse_args(args))
    assert (root / "full" / "checkpoint.pth").read_bytes() == before
    (tmp_path / "a_file").write_text("x")  # (a read-only folder is refused the same way, for users who are not root)
    with pytest.raises(engine.TrainingError, match="cannot be written"):
        script.main(parser.parse_args([*argv[:-1], str(tmp_path / "a_file" / "run")]))
