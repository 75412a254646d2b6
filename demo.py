"""`make demo`: the whole pipeline on a synthetic Market-1501, on the CPU, in a few minutes.

synthetic raw data -> prepare_market.py -> (later stages are added as they exist)
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DATA = Path("datasets/synthetic/Market")


def step(title: str, *cmd: str) -> None:
    print(f"\n== {title}\n$ python {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)
    print(f"   ({time.time() - t0:.1f} s)")


def main() -> None:
    step("generate a synthetic Market-1501 in the real raw layout",
         "make_synthetic_data.py", "--format", "market", "--out", str(DATA), "--ids", "40", "--images_per_id", "12")
    step("prepare it (train / val / train_all / query / gallery)", "prepare_market.py", "--data_dir", str(DATA))


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:
        sys.exit(f"demo step failed with exit code {e.returncode}: {' '.join(map(str, e.cmd[1:]))}")
