"""Mistakes and hostile files, as a new user makes them: every one is a single `error: ...` line with
exit status 2, never a traceback, and nothing on disk is written or overwritten. Also the BAFD paper
README's commands, verbatim, parse and run end to end (only epochs, batch size and paths shrunk).
"""
import argparse
import hashlib
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision
from conftest import mistake_problems, run_script

import APFP_train
import evaluate_gpu
import model as model_lib
import test as test_lib
import test_small
from make_synthetic_data import generate
from toolkit import run, train_loop
from toolkit.layouts import prepare_market_like

RUN_NAME = "prune_APFP/knn2/market/0.90/no_1x1_3e-1_70_0.01_m95_fast"
SEED_COMMANDS = [  # the BAFD README, character for character
    "python APFP_train.py --gpu_ids 0  --decay_rate 3e-1  --efficient_pruning --network_arch resnet18 --lr 0.01 "
    "--knn 2 --prune_rate 0.90 --max_lrate 0.95   --Epochs 70 --save_epoch 60 --name "
    "prune_APFP/knn2/market/0.90/no_1x1_3e-1_70_0.01_m95_fast --train_all --batchsize 32  "
    "--data_dir ./datasets/Market/pytorch/",
    "python test.py --gpu_ids 1 --network_arch resnet18 --name "
    "./results/ft_resnet18/prune_APFP/knn2/market/0.90/no_1x1_3e-1_70_0.01_m95_fast/ "
    "--test_dir ./datasets/Market/pytorch/  --which_epoch last",
    "python evaluate_gpu.py",
    "python test_small.py --gpu_ids 1 --network_arch resnet18 --name "
    "./results/ft_resnet18/prune_APFP/knn2/market/0.90/no_1x1_3e-1_70_0.01_m95_fast/ --NonL1 "
    "--test_dir ./datasets/Market/pytorch  --which_epoch last",
]
PARSERS = {"APFP_train.py": APFP_train.get_args_parser, "test.py": test_lib.get_args_parser,
           "evaluate_gpu.py": evaluate_gpu.get_args_parser, "test_small.py": test_small.get_args_parser}
SHRUNK = {"--Epochs": "1", "--save_epoch": "1", "--batchsize": "4"}


def shrink(argv: list[str]) -> list[str]:
    return [SHRUNK.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]


def test_seed_commands_parse_with_the_scripts_own_parsers():
    for command in SEED_COMMANDS:
        _, script, *argv = shlex.split(command)
        args = PARSERS[script]().parse_args(argv)
        if script == "APFP_train.py":
            assert (args.Epochs, args.save_epoch, args.batchsize, args.prune_rate, args.max_lrate, args.knn,
                    args.decay_rate, args.efficient_pruning, args.train_all) == (70, 60, 32, 0.9, 0.95, 2, 0.3,
                                                                                 True, True)
        elif script in ("test.py", "test_small.py"):
            assert args.network_arch == "resnet18" and args.which_epoch == "last" and args.gpu_ids == "1"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder laid out as the README expects (./datasets/Market, ./results), a torchvision cache with
    (random) ImageNet ResNet-18 weights, and the README's BAFD run trained in it."""
    root = tmp_path_factory.mktemp("world")
    generate("market", root / "datasets" / "Market", n_ids=4, per_id=4, n_cams=2, seed=5)
    prepare_market_like(root / "datasets" / "Market", "market")
    torch_home = root / "torch_home"
    cache = Path(str(model_lib.imagenet_cache_path("resnet18")).replace(str(torch.hub.get_dir()),
                                                                        str(torch_home / "hub")))
    cache.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), cache)
    env = {"TORCH_HOME": str(torch_home)}
    _, script, *argv = shlex.split(SEED_COMMANDS[0])
    res = run_script(script, *shrink(argv), cwd=root, env=env)
    assert res.returncode == 0, res.stderr
    assert "CUDA is not available" in res.stdout or torch.cuda.is_available()
    return root, env


def test_seed_commands_run_end_to_end(world):
    root, env = world
    run = root / "results" / "ft_resnet18" / RUN_NAME
    assert (run / "net_last.pth").is_file() and (run / "net_1.pth").is_file()
    for command in SEED_COMMANDS[1:]:
        _, script, *argv = shlex.split(command)
        res = run_script(script, *argv, cwd=root, env=env)
        assert res.returncode == 0, (command, res.stderr)
        if script == "evaluate_gpu.py":
            assert res.stdout.startswith("Rank@1_")
        else:
            assert "CUDA is not available" in res.stdout or torch.cuda.is_available()
    assert (run / "net_last_small.pth").is_file()


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def make_bad_files(root: Path, data12: Path) -> dict[str, Path]:
    """Corrupt and foreign files beside the good run; returns named paths for the cases."""
    run = root / "results" / "ft_resnet18" / RUN_NAME
    bad = root / "bad"
    paths = {"run": run, "data": root / "datasets" / "Market" / "pytorch", "data12": data12, "bad": bad}
    for name in ("trunc", "pickle", "nan", "other_data"):
        shutil.copytree(run, bad / "ft_resnet18" / name)
    resume = (run / "resume.pth").read_bytes()
    (bad / "ft_resnet18" / "trunc" / "resume.pth").write_bytes(resume[: len(resume) // 2])
    net_1 = (run / "net_1.pth").read_bytes()
    (bad / "ft_resnet18" / "trunc" / "net_1.pth").write_bytes(net_1[: len(net_1) // 3])
    torch.save(argparse.Namespace(model=1), bad / "ft_resnet18" / "pickle" / "resume.pth")  # not weights-only
    state = torch.load(run / "net_last.pth", weights_only=True)
    state["model.layer4.1.bn2.weight"][0] = float("nan")
    torch.save(state, bad / "ft_resnet18" / "nan" / "net_last.pth")
    # a training set of one identity, and one with an image that does not decode
    one = bad / "one_id" / "train_all"
    first = sorted((paths["data"] / "train_all").iterdir())[0]
    shutil.copytree(first, one / first.name)
    shutil.copytree(paths["data"] / "train_all", bad / "broken_img" / "train_all")
    (bad / "broken_img" / "train_all" / first.name / f"{first.name}_c1s1_999999_00.jpg").write_bytes(b"not a jpeg")
    # a raw dataset whose query folder is empty
    raw = bad / "raw_no_query"
    for folder in ("bounding_box_train", "bounding_box_test", "query"):
        shutil.copytree(root / "datasets" / "Market" / folder, raw / folder)
    for f in (raw / "query").iterdir():
        f.unlink()
    # result files
    mats = bad / "mats"
    mats.mkdir()
    rng = np.random.default_rng(0)
    good = {"query_f": rng.normal(size=(3, 4)).astype(np.float32), "query_label": np.array([1, 2, 3]),
            "query_cam": np.array([1, 1, 2]), "gallery_f": rng.normal(size=(5, 4)).astype(np.float32),
            "gallery_label": np.array([1, 2, 3, -1, 0]), "gallery_cam": np.array([2, 2, 1, 1, 1])}
    variants = {"nan": {"gallery_f": np.where(np.eye(5, 4) > 0, np.nan, good["gallery_f"]).astype(np.float32)},
                "length": {"gallery_label": np.array([1, 2, 3])},
                "dims": {"query_f": rng.normal(size=(3, 6)).astype(np.float32)},
                "empty_query": {"query_f": np.zeros((0, 4), np.float32), "query_label": np.zeros((1, 0)),
                                "query_cam": np.zeros((1, 0))}}
    for name, change in variants.items():
        scipy.io.savemat(mats / f"{name}.mat", {**good, **change})
    scipy.io.savemat(mats / "good.mat", good)
    (mats / "truncated.mat").write_bytes((mats / "good.mat").read_bytes()[:200])
    # pipeline outputs that exist already
    (bad / "iter_out").mkdir()
    (bad / "iter_out" / "metrics.json").write_text(json.dumps([{"round": 0, "checkpoint": "x"}]))
    (bad / "iter_trunc").mkdir()
    (bad / "iter_trunc" / "metrics.json").write_text('[{"round": 0, "check')
    (bad / "quant_out").mkdir()
    (bad / "quant_out" / "fp32.onnx").write_bytes(b"earlier result")
    (bad / "a_file").write_text("not a folder")
    shutil.copytree(run, bad / "collect" / "ft_resnet18" / "run")
    (bad / "collect" / "ft_resnet18" / "run" / "metrics_last.json").write_text('{"rank1": 0.5, "mA')
    return paths


def bad_cases(p: dict[str, Path]) -> list[tuple[str, str, list, str]]:
    """(case, script, argv, expected text of the error line)."""
    seed = shrink(shlex.split(SEED_COMMANDS[0])[2:])
    sfp = ["--network_arch", "resnet18", "--name", RUN_NAME, "--train_all", "--batchsize", "4", "--data_dir",
           p["data"]]
    fresh = ["--data_dir", p["data"], "--results_dir", p["bad"] / "fresh_runs", "--name", "x", "--no_pretrained",
             "--network_arch", "resnet18", "--train_all", "--workers", "0", "--height", "64", "--width", "32",
             "--batchsize", "4"]
    at = lambda name: ["--results_dir", p["bad"], "--name", name]  # noqa: E731  (a copy of the good run)
    tiny = ["--height", "64", "--width", "32", "--workers", "0"]
    mat = lambda name: ["--mat", p["bad"] / "mats" / f"{name}.mat"]  # noqa: E731
    return [
        # flags, alone and together
        ("batchsize 0", "APFP_train.py", [*fresh, "--batchsize", "0"], "argument --batchsize"),
        ("batchsize negative", "SFP_train.py", [*fresh, "--batchsize", "-3"], "argument --batchsize"),
        ("milestones abc", "APFP_train.py", [*fresh, "--milestones", "40,abc"], "argument --milestones"),
        ("Epochs 0", "FPGM_train.py", [*fresh, "--Epochs", "0"], "argument --Epochs"),
        ("lr nan", "L1_train.py", [*fresh, "--lr", "nan"], "argument --lr"),
        ("prune_rate 1", "SFP_train.py", [*fresh, "--prune_rate", "1"], "argument --prune_rate"),
        ("erasing_p 2", "APFP_train.py", [*fresh, "--erasing_p", "2"], "argument --erasing_p"),
        ("decay_rate 1.5", "APFP_train.py", [*fresh, "--decay_rate", "1.5"], "argument --decay_rate"),
        ("decay_rate -0.1", "APFP_train.py", [*fresh, "--decay_rate=-0.1"], "argument --decay_rate"),
        ("knn 0", "APFP_train.py", [*fresh, "--knn", "0"], "argument --knn"),
        ("max_lrate below prune_rate", "APFP_train.py", [*fresh, "--prune_rate", "0.9", "--max_lrate", "0.5"],
         "--max_lrate 0.5 is below --prune_rate 0.9"),
        ("no_pretrained with pretrained", "APFP_train.py", [*fresh, "--pretrained", p["run"] / "net_last.pth"],
         "contradict"),
        ("unknown arch", "SFP_train.py", [*fresh, "--network_arch", "resnet99"], "unknown arch"),
        ("unknown loss", "SFP_train.py", [*fresh, "--loss", "focal"], "focal"),
        ("gpu_ids abc", "SFP_train.py", [*fresh, "--gpu_ids", "abc"], "--gpu_ids must be"),
        ("missing dataset", "APFP_train.py", [*fresh, "--data_dir", p["bad"] / "nowhere"], "does not exist"),
        ("results_dir is a file", "APFP_train.py", [*fresh, "--results_dir", p["bad"] / "a_file"], "a_file"),
        # runs that exist, resumes that do not fit
        ("existing run without --resume", "APFP_train.py", seed, "already holds a run"),
        ("resume BAFD run with SFP", "SFP_train.py", [*sfp, "--resume", "--prune_rate", "0.2"], "used 'bafd'"),
        ("resume with another rate", "APFP_train.py", [*seed, "--resume", "--prune_rate", "0.5"], "used 0.9"),
        ("resume with another decay", "APFP_train.py", [*seed, "--resume", "--decay_rate", "0.5"],
         "used 0.3"),
        ("resume without resume.pth", "APFP_train.py", [*fresh, "--resume"], "resume.pth does not exist"),
        ("resume truncated", "APFP_train.py", [*seed, *at("trunc"), "--resume"], "trunc/resume.pth is corrupt"),
        ("resume not weights-only", "APFP_train.py", [*seed, *at("pickle"), "--resume"],
         "not a weights-only checkpoint"),
        ("resume on another dataset", "APFP_train.py",
         [*seed, *at("other_data"), "--resume", "--data_dir", p["data12"]], "trained on 2 identities"),
        # data
        ("one identity", "APFP_train.py", [*fresh, "--data_dir", p["bad"] / "one_id"], "at least 2"),
        ("image that does not decode", "APFP_train.py",
         [*fresh, "--data_dir", p["bad"] / "broken_img", "--workers", "1"], "cannot read image"),
        ("prepare: empty query", "prepare_market.py", ["--data_dir", p["bad"] / "raw_no_query"],
         "no images for the query split"),
        ("prepare: no dataset", "prepare_duke.py", ["--data_dir", p["bad"] / "nowhere"], "does not exist"),
        # testing
        ("test: wrong arch", "test.py", ["--name", p["run"], "--network_arch", "resnet50", *tiny], "holds a resnet18"),
        ("test: unknown run", "test.py", ["--name", "nothing_here", "--results_dir", p["bad"]], "no run"),
        ("test: missing epoch", "test.py", ["--name", p["run"], "--which_epoch", "99"], "does not exist"),
        ("test: NaN weights", "test.py", [*at("nan"), "--test_dir", p["data"], "--mat", p["bad"] / "nan.mat", *tiny],
         "NaN or infinite values"),
        ("test: batchsize 0", "test.py", ["--name", p["run"], "--batchsize", "0"], "argument --batchsize"),
        ("test: mat in a file", "test.py", ["--name", p["run"], "--test_dir", p["data"], "--mat",
                                            p["bad"] / "a_file" / "r.mat", *tiny], "a_file"),
        ("test_small: truncated", "test_small.py", [*at("trunc"), "--NonL1", "--which_epoch", "1", "--no_features"],
         "truncated or corrupt"),
        ("evaluate: truncated mat", "evaluate_gpu.py", mat("truncated"), "cannot read"),
        ("evaluate: NaN features", "evaluate_gpu.py", mat("nan"), "NaN or infinite"),
        ("evaluate: lengths disagree", "evaluate_gpu.py", mat("length"), "gallery_label has 3 entries"),
        ("evaluate: feature sizes disagree", "evaluate_gpu.py", mat("dims"), "6 dims"),
        ("evaluate: empty query set", "evaluate_gpu.py", mat("empty_query"), "query set is empty"),
        ("evaluate: json in a file", "evaluate_gpu.py", [*mat("good"), "--json", p["bad"] / "a_file" / "m.json"],
         "cannot write"),
        ("evaluate: gpu_ids x", "evaluate_gpu.py", [*mat("good"), "--gpu_ids", "x"], "--gpu_ids must be"),
        # pipelines
        ("iterative: existing out", "iterative_compress.py",
         ["--checkpoint", p["run"] / "net_last.pth", "--out", p["bad"] / "iter_out", "--data_dir", p["data"]],
         "already holds results"),
        ("iterative: truncated metrics", "iterative_compress.py",
         ["--checkpoint", p["run"] / "net_last.pth", "--out", p["bad"] / "iter_trunc", "--data_dir", p["data"],
          "--resume"], "corrupt or truncated"),
        ("iterative: rounds 0", "iterative_compress.py",
         ["--checkpoint", p["run"] / "net_last.pth", "--out", p["bad"] / "new", "--rounds", "0"], "argument --rounds"),
        ("quantize: existing out", "quantize.py",
         ["--checkpoint", p["run"] / "net_last.pth", "--out", p["bad"] / "quant_out", "--data_dir", p["data"]],
         "already holds results"),
        ("runtime: batch sizes", "runtime_comparison.py", ["--name", p["run"], "--batch_sizes", "1,x"],
         "argument --batch_sizes"),
        ("synthetic: ids 0", "make_synthetic_data.py", ["--ids", "0", "--out", p["bad"] / "syn"], "argument --ids"),
        ("demo: epochs -1", "demo.py", ["--epochs", "-1"], "argument --epochs"),
        ("collect: truncated metrics", "collect_results.py", ["--results_dir", p["bad"] / "collect",
                                                              "--out", p["bad"] / "collect_out"], "truncated"),
    ]


def test_bad_inputs_are_one_line_errors_and_write_nothing(world, synthetic_market, tmp_path):
    root, env = world
    paths = make_bad_files(root, synthetic_market / "pytorch")
    cases = bad_cases(paths)
    before = digest(root)
    problems = mistake_problems(cases, root, env, tmp_path, timeout=600)
    assert not problems, "\n".join(problems)
    after = digest(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"files written or changed: {changed}"
    assert not list(root.rglob(".*.tmp")), "a temporary file was left behind"


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(synthetic_market, tmp_path, monkeypatch):
    from toolkit import losses
    argv = ["--data_dir", str(synthetic_market / "pytorch"), "--train_all", "--network_arch", "resnet18",
            "--no_pretrained", "--Epochs", "3", "--batchsize", "24", "--height", "32", "--width", "16",
            "--workers", "0", "--results_dir", str(tmp_path), "--name", "run"]
    args = train_loop.add_training_args(argparse.ArgumentParser()).parse_args(argv)
    real, calls = losses.batch_loss, []
    steps = len(train_loop.data.AnchorPositives(synthetic_market / "pytorch" / "train_all", None)) // 24

    def nan_in_epoch_2_step_2(*a, **k):
        loss, stats = real(*a, **k)
        calls.append(1)
        return (loss * float("nan") if len(calls) == steps + 2 else loss), stats

    monkeypatch.setattr(losses, "batch_loss", nan_in_epoch_2_step_2)
    with pytest.raises(train_loop.TrainingError, match=rf"the loss is nan at epoch 2, step 2/{steps}:"):
        train_loop.train(args)
    state = torch.load(tmp_path / "ft_resnet18" / "run" / "resume.pth", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                       if v.is_floating_point())


def test_weights_that_diverge_are_not_saved():
    net = torch.nn.Linear(2, 2)
    run.check_finite_weights(net, "epoch 1")
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    with pytest.raises(train_loop.TrainingError, match="epoch 4 \\(weight\\)"):
        run.check_finite_weights(net, "epoch 4")


def test_written_files_keep_the_normal_mode(tmp_path):
    import os

    from toolkit import utils
    old = os.umask(0o022)
    try:
        utils.write_text_atomic("x", tmp_path / "a.txt")
        utils.save_atomic({"w": torch.zeros(1)}, tmp_path / "b.pth")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.pth").stat().st_mode & 0o777 == 0o644


def test_overwrite_replaces_an_existing_run(tmp_path):
    out = tmp_path / "ft_resnet18" / "run"
    out.mkdir(parents=True)
    for name in ("net_7.pth", "opts.yaml", "resume.pth", "notes.txt"):
        (out / name).write_text("an earlier run")
    args = argparse.Namespace(resume=False, overwrite=False, data_dir="d")
    with pytest.raises(train_loop.TrainingError, match="already holds a run"):
        train_loop.check_run_folder(out, args, "bafd")
    args.overwrite = True
    folder, _ = train_loop.check_run_folder(out, args, "bafd")
    folder.start()
    (folder.path / "net_last.pth").write_text("the new run")
    assert sorted(p.name for p in out.iterdir()) == ["net_7.pth", "notes.txt", "opts.yaml", "resume.pth"]
    folder.commit()  # the first complete checkpoint: the folder now holds the new run only
    assert [p.name for p in out.iterdir()] == ["net_last.pth"]
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())
