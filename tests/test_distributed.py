"""torchrun / DDP on the CPU (Gloo): identical ranks, one writer, sharded test.py, batch equivalence."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import torch
import torch.multiprocessing as mp
from conftest import ROOT, run_script

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
COMMON = ["--train_all", "--network_arch", "resnet18", "--no_pretrained", "--batchsize", "4", "--height", "64",
          "--width", "32", "--workers", "0", "--lr", "0.1", "--prune_rate", "0.5"]


def torchrun(*args, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_two_ranks_stay_identical_and_one_checkpoint_is_written(synthetic_market, tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    res = torchrun(ROOT / "tests" / "ddp_probe.py", "--data_dir", synthetic_market / "pytorch", "--results_dir",
                   tmp_path, "--name", "ddp", "--Epochs", "2", "--efficient_pruning", *COMMON,
                   env={"PROBE_OUT": str(probe)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for sync in (1, 2, 3):  # after creation, after epoch 1, after epoch 2
        a, b = (json.loads((probe / f"rank{r}_sync{sync}.json").read_text()) for r in (0, 1))
        assert a == b, f"ranks differ at synchronisation {sync}"
    run = tmp_path / "ft_resnet18" / "ddp"
    assert sorted(p.name for p in run.glob("net_*.pth")) == ["net_last.pth"]
    assert res.stdout.count("epoch 2/2") == 1  # only rank 0 prints
    assert "x 2 processes" in res.stdout
    test = run_script("test.py", "--name", run, "--test_dir", synthetic_market / "pytorch", "--workers", "0",
                      "--mat", tmp_path / "r.mat")
    assert test.returncode == 0, test.stderr


def test_sharded_test_py_equals_single_process(synthetic_market, tmp_path):
    from model import ft_net
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    torch.save(ft_net(6, "resnet18").state_dict(), run / "net_last.pth")
    common = ["--name", run, "--test_dir", synthetic_market / "pytorch", "--workers", "0", "--height", "64",
              "--width", "32", "--batchsize", "16"]
    single = run_script("test.py", *common, "--mat", tmp_path / "single.mat")
    assert single.returncode == 0, single.stderr
    sharded = torchrun(ROOT / "test.py", *common, "--mat", tmp_path / "sharded.mat")
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    a, b = scipy.io.loadmat(tmp_path / "single.mat"), scipy.io.loadmat(tmp_path / "sharded.mat")
    for key in ("query_label", "query_cam", "gallery_label", "gallery_cam"):
        assert np.array_equal(a[key], b[key]), key
    for key in ("query_f", "gallery_f"):
        assert np.abs(a[key] - b[key]).max() < 1e-5, key


def step_gradients(rank: int, world: int, port: int, batch: dict, out: str) -> None:
    """One loss_and_backward on this rank's slice of `batch`; rank 0 saves the loss and gradients."""
    from model import ft_net
    from toolkit import distributed, train_loop
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = ft_net(4, "resnet18")
    args = argparse.Namespace(poolsize=12, margin=0.3, channels_last=False, sync_bn=False,
                              loss="triplet+circle+softmax", circle_m=0.25, circle_gamma=64.0)
    pair = train_loop.wrap_for_training(net, torch.device("cpu"), args)  # DDP when world > 1
    pair.eval()  # frozen BN statistics: per-rank batch statistics would differ (use --sync_bn on GPUs)
    b = len(batch["labels"]) // world
    part = slice(rank * b, (rank + 1) * b)
    loss, _ = train_loop.loss_and_backward(pair, batch["imgs"][part], batch["labels"][part],
                                           batch["positives"][4 * rank * b:4 * (rank + 1) * b], args,
                                           torch.Generator().manual_seed(5))
    total = distributed.sum_over_ranks([loss.item()], torch.device("cpu"))[0]
    if rank == 0:
        torch.save({"loss": total, "grads": {n: p.grad.clone() for n, p in net.named_parameters()
                                             if p.grad is not None}}, out)
    if world > 1:
        torch.distributed.destroy_process_group()


def test_two_ranks_of_batch_b_equal_one_process_of_batch_2b(tmp_path):
    gen = torch.Generator().manual_seed(1)
    batch = {"imgs": torch.randn(4, 3, 64, 32, generator=gen), "labels": torch.tensor([0, 1, 2, 1]),
             "positives": torch.randn(16, 3, 64, 32, generator=gen)}
    step_gradients(0, 1, 0, batch, str(tmp_path / "single.pt"))
    port = 29000 + os.getpid() % 1000
    mp.spawn(step_gradients, args=(2, port, batch, str(tmp_path / "ddp.pt")), nprocs=2)
    single, ddp = (torch.load(tmp_path / f, weights_only=True) for f in ("single.pt", "ddp.pt"))
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert set(single["grads"]) == set(ddp["grads"])
    for name, g in single["grads"].items():
        assert torch.allclose(ddp["grads"][name], g, rtol=1e-4, atol=1e-6), name


def test_two_process_classification_resume_equals_uninterrupted(tmp_path):
    """Each rank keeps its own RNG state in checkpoint.pth: stopped after epoch 1 and resumed, a 2-process SFP
    run ends with the same weights, bit for bit, as the uninterrupted 2-process run."""
    from classification.synthetic import write_cifar10
    write_cifar10(tmp_path / "data", per_class=12, seed=0)
    argv = ["-m", "classification.pruning_cifar10_resnet", tmp_path / "data", "--arch", "resnet20", "--schedule", "1",
            "--gammas", "1", "--learning_rate", "0.05", "--batch_size", "8", "--rate", "0.7", "--layer_begin", "0",
            "--layer_end", "54", "--layer_inter", "3", "--workers", "0"]
    runs = [("full", ["--epochs", "2"]), ("half", ["--epochs", "1"]),
            ("half", ["--epochs", "2", "--resume", tmp_path / "half" / "checkpoint.pth"])]
    for folder, extra in runs:
        res = torchrun(*argv, "--save_path", tmp_path / folder, *extra)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    a, b = (torch.load(tmp_path / f / "checkpoint.pth", weights_only=True) for f in ("full", "half"))
    assert len(a["rng"]) == 2 and not torch.equal(a["rng"][0]["torch"], a["rng"][1]["torch"])
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
