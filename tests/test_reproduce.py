"""scripts/*.sh only use flags that exist; collect_results.py tables and plots; the demo end to end."""
import importlib
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import torch
from conftest import ROOT, run_script

import collect_results
from evaluate_gpu import evaluate

SCRIPTS = ["APFP_train.sh", "SFP_train.sh", "FPGM_train.sh", "L1_train.sh", "test.sh", "small_test.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_dry_run_command_parses_with_its_scripts_own_parser(script):
    res = subprocess.run(["bash", str(ROOT / "scripts" / script)], env={**os.environ, "DRY_RUN": "1"},
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    commands = [shlex.split(line) for line in res.stdout.splitlines() if line.strip()]
    assert len(commands) >= 6
    for argv in commands:
        assert argv[0] == "python" and argv[1].endswith(".py"), argv
        module = importlib.import_module(argv[1][:-3])
        parser = module.get_args_parser()
        parser.exit = parser.error = lambda *a, **k: pytest.fail(f"{script}: {' '.join(argv)} -> {a}")
        parser.parse_args(argv[2:])


def test_dry_run_covers_the_paper_grid():
    res = subprocess.run(["bash", str(ROOT / "scripts" / "APFP_train.sh")], env={**os.environ, "DRY_RUN": "1"},
                         capture_output=True, text=True, cwd=ROOT)
    lines = res.stdout.splitlines()
    assert len(lines) == 3 * 3 * 2  # 3 datasets x 3 archs x 2 rates
    assert all("--max_lrate 0.95" in line and "--knn 2" in line and "--decay_rate 0.3" in line for line in lines)
    assert any("MSMT17_V1/pytorch" in line and "resnet50" in line and "--prune_rate 0.9" in line for line in lines)


def test_collect_results_rows_and_plot(tmp_path):
    from model import ft_net
    rng = np.random.default_rng(0)
    expected = {}
    for method, arch, rate in [("bafd", "resnet18", 0.5), ("sfp", "resnet18", 0.9)]:
        run = tmp_path / f"ft_{arch}" / f"{method}_{arch}_Market_{rate}"
        run.mkdir(parents=True)
        torch.save(ft_net(5, arch).state_dict(), run / "net_last.pth")
        (run / "opts.yaml").write_text(f"method: {method}\nnetwork_arch: {arch}\nprune_rate: {rate}\n"
                                       "data_dir: /data/Market/pytorch\n")
        q, g = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(20, 8)).astype(np.float32)
        case = (q, rng.integers(1, 4, 6), rng.integers(1, 3, 6), g, rng.integers(-1, 4, 20), rng.integers(1, 3, 20))
        scipy.io.savemat(run / "pytorch_result.mat", dict(zip(["query_f", "query_label", "query_cam", "gallery_f",
                                                               "gallery_label", "gallery_cam"], case)))
        expected[method] = evaluate(*case, device="cpu")
    res = run_script("collect_results.py", "--results_dir", tmp_path, "--input_size", "64,32")
    assert res.returncode == 0, res.stderr
    rows = {r["method"]: r for r in collect_results.collect(tmp_path, size=(64, 32))}
    assert set(rows) == {"bafd", "sfp"}
    for method, metrics in expected.items():
        assert rows[method]["mAP"] == pytest.approx(metrics["mAP"]) and rows[method]["dataset"] == "Market"
        run = f"{method}_resnet18_Market_{rows[method]['prune_rate']}"
        assert (tmp_path / "ft_resnet18" / run / "metrics_last.json").is_file()
    assert rows["sfp"]["prune_rate"] == 0.9 and rows["bafd"]["params_M"] > 0
    summary = tmp_path / "summary"
    assert "| bafd | resnet18 | Market |" in (summary / "results.md").read_text()
    assert len((summary / "results.csv").read_text().splitlines()) == 3
    png = summary / "mAP_vs_MACs_Market.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_demo_end_to_end_at_its_smallest_size(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--data", str(tmp_path / "Market"), "--results_dir",
                          str(tmp_path / "results"), "--ids", "8", "--epochs", "1", "--runtime_repeats", "1",
                          "--no_onnx"],  # the ONNX Runtime rows have tests of their own (test_small_model.py)
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "== results" in res.stdout and "over the untrained network" in res.stdout
    metrics = json.loads((tmp_path / "results" / "ft_resnet18" / "demo_bafd" / "metrics_last.json").read_text())
    assert 0 <= metrics["mAP"] <= 1
    assert (tmp_path / "results" / "summary" / "mAP_vs_MACs_Market.png").is_file()
