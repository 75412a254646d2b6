"""`make demo`: the whole pipeline on a synthetic Market-1501, on the CPU, in a few minutes.

synthetic raw data -> prepare_market.py -> APFP_train.py (ResNet-18, BAFD) -> test.py -> evaluate_gpu.py
-> test_small.py -> evaluate_gpu.py -> runtime_comparison.py, next to an untrained network's score.
Every step is the command a user would type; they are printed as they run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from toolkit import cli

ROOT = Path(__file__).resolve().parent


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="datasets/synthetic/Market", help="where the synthetic dataset goes")
    p.add_argument("--results_dir", default="./results", help="root folder of the runs")
    p.add_argument("--ids", type=cli.positive_int, default=40, help="identities in the synthetic dataset")
    p.add_argument("--epochs", type=cli.positive_int, default=8, help="training epochs")
    p.add_argument("--height", type=cli.positive_int, default=64,
                   help="training/test input height (the paper uses 256)")
    p.add_argument("--width", type=cli.positive_int, default=32, help="training/test input width (the paper uses 128)")
    p.add_argument("--prune_rate", type=cli.prune_fraction, default=0.5, help="BAFD prune rate")
    p.add_argument("--no_onnx", action="store_true",
                   help="leave the ONNX Runtime rows out of the latency table (their exports take a while)")
    p.add_argument("--runtime_repeats", type=cli.positive_int, default=5,
                   help="timed runs per model in the runtime table")
    return p


def step(title: str, *cmd: str) -> str:
    print(f"\n== {title}\n$ python {' '.join(cmd)}", flush=True)
    t0 = time.time()
    out = subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    print(out.rstrip() + f"\n   ({time.time() - t0:.1f} s)", flush=True)
    return out


def save_untrained(run: Path, num_classes: int, data_dir: str, size: tuple[int, int]) -> None:
    """A randomly initialised ResNet-18 checkpoint: the score a network gets before any training."""
    import torch

    from model import ft_net
    from toolkit import utils
    torch.manual_seed(0)
    utils.save_atomic(ft_net(num_classes, "resnet18").state_dict(), run / "net_last.pth")
    utils.save_options({"method": "untrained", "network_arch": "resnet18", "data_dir": data_dir, "prune_rate": 0.0,
                        "height": size[0], "width": size[1]}, run / "opts.yaml")


def test_and_evaluate(run: Path, test_dir: str, small: bool = False) -> None:
    """Features and metrics beside the checkpoint, as scripts/test.sh and scripts/small_test.sh store them."""
    suffix = "_small" if small else ""
    mat, metrics = str(run / f"pytorch_result{suffix}.mat"), str(run / f"metrics_last{suffix}.json")
    if small:
        step("build the physically smaller network and test it", "test_small.py", "--name", str(run), "--NonL1",
             "--test_dir", test_dir, "--mat", mat, "--workers", "0")
    else:
        step(f"extract the features of {run.name}", "test.py", "--name", str(run), "--test_dir", test_dir,
             "--mat", mat, "--workers", "0")
    step("evaluate them", "evaluate_gpu.py", "--mat", mat, "--multi_mat", str(run / "none.mat"), "--json", metrics)


def main(args: argparse.Namespace) -> None:
    data, pt = Path(args.data), str(Path(args.data) / "pytorch")
    size = ["--height", str(args.height), "--width", str(args.width)]
    runs = Path(args.results_dir) / "ft_resnet18"
    step("generate a synthetic Market-1501 in the real raw layout", "make_synthetic_data.py", "--format", "market",
         "--out", str(data), "--ids", str(args.ids), "--images_per_id", "12")
    step("prepare it (train / val / train_all / query / gallery / multi-query)", "prepare_market.py",
         "--data_dir", str(data))
    n_classes = len(list((data / "pytorch" / "train_all").iterdir()))
    save_untrained(ROOT / runs / "demo_untrained", n_classes, pt, (args.height, args.width))
    test_and_evaluate(runs / "demo_untrained", pt)
    step(f"prune a ResNet-18 with BAFD while training it ({args.epochs} epochs, from scratch, CPU)", "APFP_train.py",
         "--network_arch", "resnet18", "--name", "demo_bafd", "--data_dir", pt, "--train_all", "--no_pretrained",
         "--results_dir", args.results_dir, "--prune_rate", str(args.prune_rate), "--max_lrate", "0.8", "--knn", "2",
         "--decay_rate", "0.3", "--efficient_pruning", "--Epochs", str(args.epochs), "--milestones",
         f"{max(args.epochs - 2, 1)}", "--batchsize", "16", "--lr", "0.1", "--workers", "2", "--overwrite", *size)
    test_and_evaluate(runs / "demo_bafd", pt)
    test_and_evaluate(runs / "demo_bafd", pt, small=True)
    step("compare latency on the CPU at 3x256x128", "runtime_comparison.py", "--name", str(runs / "demo_bafd"),
         "--NonL1", "--batch_sizes", "1,8", "--repeats", str(args.runtime_repeats), "--warmup", "2",
         *(["--no_onnx"] if args.no_onnx else []))
    step("collect every run into one table and plot", "collect_results.py", "--results_dir", args.results_dir)
    summary(ROOT / runs)


def summary(runs: Path) -> None:
    load = lambda name: json.loads((runs / name).read_text())  # noqa: E731
    untrained, zeroed, small = (load(f) for f in ("demo_untrained/metrics_last.json", "demo_bafd/metrics_last.json",
                                                  "demo_bafd/metrics_last_small.json"))
    rows = {r["model"]: r for r in load("demo_bafd/runtime_last_cpu.json")}
    print("\n== results (synthetic Market-1501, ResNet-18, BAFD; latency at 3x256x128)")
    print(f"{'network':22s} {'mAP':>7s} {'Rank@1':>7s} {'params (M)':>10s} {'GMACs':>7s} {'CPU ms (b1)':>11s}")
    for label, m, r in [("untrained", untrained, rows["full"]), ("BAFD, zeroed", zeroed, rows["zeroed"]),
                        ("BAFD, small", small, rows["small"])]:
        print(f"{label:22s} {m['mAP']:7.3f} {m['rank1']:7.3f} {r['params'] / 1e6:10.3f} {r['macs'] / 1e9:7.3f} "
              f"{r['ms_b1']:11.2f}")
    onnx = (f" ({rows['small (onnxruntime)']['speedup_b1']:.2f}x under ONNX Runtime)"
            if "small (onnxruntime)" in rows else "")
    print(f"trained mAP is {zeroed['mAP'] - untrained['mAP']:+.3f} over the untrained network; the small network "
          f"has {rows['small']['mac_ratio']:.2f}x fewer MACs and runs {rows['small']['speedup_b1']:.2f}x faster at "
          f"batch 1{onnx}")
    print(f"plot: {runs.parent / 'summary' / 'mAP_vs_MACs_Market.png'}")


def run_demo(args: argparse.Namespace) -> None:
    try:
        main(args)
    except subprocess.CalledProcessError as e:  # the step printed its own error line above
        raise cli.UsageError(f"demo step failed with exit code {e.returncode}: {' '.join(map(str, e.cmd[1:]))}") \
            from None


if __name__ == "__main__":
    cli.run_main(run_demo, get_args_parser().parse_args())
