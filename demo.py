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

ROOT = Path(__file__).resolve().parent


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="datasets/synthetic/Market", help="where the synthetic dataset goes")
    p.add_argument("--results_dir", default="./results", help="root folder of the runs")
    p.add_argument("--ids", type=int, default=40, help="identities in the synthetic dataset")
    p.add_argument("--epochs", type=int, default=8, help="training epochs")
    p.add_argument("--height", type=int, default=64, help="training/test input height (the paper uses 256)")
    p.add_argument("--width", type=int, default=32, help="training/test input width (the paper uses 128)")
    p.add_argument("--prune_rate", type=float, default=0.5, help="BAFD prune rate")
    p.add_argument("--runtime_repeats", type=int, default=5, help="timed runs per model in the runtime table")
    return p


def step(title: str, *cmd: str) -> str:
    print(f"\n== {title}\n$ python {' '.join(cmd)}", flush=True)
    t0 = time.time()
    out = subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    print(out.rstrip() + f"\n   ({time.time() - t0:.1f} s)", flush=True)
    return out


def save_untrained(run: Path, num_classes: int, size: tuple[int, int]) -> None:
    """A randomly initialised ResNet-18 checkpoint: the score a network gets before any training."""
    import torch

    import utils
    from model import ft_net
    torch.manual_seed(0)
    utils.save_atomic(ft_net(num_classes, "resnet18").state_dict(), run / "net_last.pth")
    utils.save_options({"height": size[0], "width": size[1]}, run / "opts.yaml")


def main(args: argparse.Namespace) -> None:
    data, pt = Path(args.data), str(Path(args.data) / "pytorch")
    size = ["--height", str(args.height), "--width", str(args.width)]
    runs = Path(args.results_dir) / "ft_resnet18"
    step("generate a synthetic Market-1501 in the real raw layout", "make_synthetic_data.py", "--format", "market",
         "--out", str(data), "--ids", str(args.ids), "--images_per_id", "12")
    step("prepare it (train / val / train_all / query / gallery / multi-query)", "prepare_market.py",
         "--data_dir", str(data))
    n_classes = len(list((data / "pytorch" / "train_all").iterdir()))
    save_untrained(ROOT / runs / "demo_untrained", n_classes, (args.height, args.width))
    mats = {k: str(ROOT / runs / f"demo_{k}.mat") for k in ("untrained", "zeroed", "small")}
    step("test an untrained ResNet-18 (the baseline to beat)", "test.py", "--name", "demo_untrained",
         "--results_dir", args.results_dir, "--test_dir", pt, "--mat", mats["untrained"], "--workers", "0")
    step("evaluate it", "evaluate_gpu.py", "--mat", mats["untrained"], "--json", mats["untrained"] + ".json")
    step(f"prune a ResNet-18 with BAFD while training it ({args.epochs} epochs, from scratch, CPU)", "APFP_train.py",
         "--network_arch", "resnet18", "--name", "demo", "--data_dir", pt, "--train_all", "--no_pretrained",
         "--results_dir", args.results_dir, "--prune_rate", str(args.prune_rate), "--max_lrate", "0.8", "--knn", "2",
         "--decay_rate", "0.3", "--efficient_pruning", "--Epochs", str(args.epochs), "--milestones",
         f"{args.epochs - 2}", "--batchsize", "16", "--lr", "0.1", "--workers", "2", *size)
    step("extract its features (zeroed checkpoint)", "test.py", "--name", "demo", "--results_dir", args.results_dir,
         "--test_dir", pt, "--mat", mats["zeroed"], "--workers", "0")
    step("evaluate", "evaluate_gpu.py", "--mat", mats["zeroed"], "--json", mats["zeroed"] + ".json")
    step("build the physically smaller network and test it", "test_small.py", "--name", "demo", "--NonL1",
         "--results_dir", args.results_dir, "--test_dir", pt, "--mat", mats["small"], "--workers", "0")
    step("evaluate the small network (same numbers as the zeroed one)", "evaluate_gpu.py", "--mat", mats["small"],
         "--json", mats["small"] + ".json")
    step("compare latency on the CPU at 3x256x128", "runtime_comparison.py", "--name", "demo", "--NonL1",
         "--results_dir", args.results_dir, "--batch_sizes", "1,8", "--repeats", str(args.runtime_repeats),
         "--warmup", "2")
    summary(mats, ROOT / runs / "demo" / "runtime_last_cpu.json")


def summary(mats: dict, runtime_json: Path) -> None:
    metrics = {k: json.loads(Path(v + ".json").read_text()) for k, v in mats.items()}
    rows = {r["model"]: r for r in json.loads(runtime_json.read_text())}
    print("\n== results (synthetic Market-1501, ResNet-18, BAFD)")
    print(f"{'network':22s} {'mAP':>7s} {'Rank@1':>7s} {'params (M)':>10s} {'GMACs':>7s} {'CPU ms (b1)':>11s}")
    for label, key, row in [("untrained", "untrained", "full"), ("BAFD, zeroed", "zeroed", "zeroed"),
                            ("BAFD, small", "small", "small")]:
        m, r = metrics[key], rows[row]
        print(f"{label:22s} {m['mAP']:7.3f} {m['rank1']:7.3f} {r['params'] / 1e6:10.3f} {r['macs'] / 1e9:7.3f} "
              f"{r['ms_b1']:11.2f}")
    gain = metrics["zeroed"]["mAP"] - metrics["untrained"]["mAP"]
    print(f"trained mAP is {gain:+.3f} over the untrained network; the small network has "
          f"{rows['small']['mac_ratio']:.2f}x fewer MACs and runs {rows['small']['speedup_b1']:.2f}x faster at batch 1")
    print(f"runtime table: {runtime_json.with_suffix('.csv')}")


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except subprocess.CalledProcessError as e:
        sys.exit(f"demo step failed with exit code {e.returncode}: {' '.join(map(str, e.cmd[1:]))}")
