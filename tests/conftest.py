import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class ScriptServer:
    """tests/script_runner.py --serve: scripts run in processes forked from one that has imported torch
    and the project once (about 5 s saved per call), each with its own cwd, env, argv, output and status."""

    def __init__(self):
        self.proc = None

    def run(self, case: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "script_runner.py"), "--serve"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())


SERVER = ScriptServer()


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: int = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would, `python SCRIPT ARGS` in its own process (extra
    environment variables in env); script "-m transreid.train" runs a module. Returns the completed process."""
    argv = [str(a) for a in args]
    r = SERVER.run({"script": script, "args": argv, "cwd": str(cwd or ROOT), "env": env or {}, "timeout": timeout})
    return subprocess.CompletedProcess([sys.executable, *script.split(" ", 1), *argv], r["code"], r["stdout"],
                                       r["stderr"])


@pytest.fixture(scope="session")
def synthetic_market(tmp_path_factory) -> Path:
    """A small prepared synthetic Market-1501 (raw layout + pytorch/), shared by the whole session."""
    from make_synthetic_data import generate
    from toolkit.layouts import prepare_market_like
    root = tmp_path_factory.mktemp("data") / "Market"
    generate("market", root, n_ids=12, per_id=8, n_cams=4, seed=3)
    prepare_market_like(root, "market")
    return root


@pytest.fixture(scope="session")
def synthetic_occ_duke(tmp_path_factory) -> Path:
    """DATASETS.ROOT_DIR holding a small synthetic Occluded_Duke/ (raw layout, occluded queries)."""
    from make_synthetic_data import generate
    root = tmp_path_factory.mktemp("transreid_data")
    generate("occluded_duke", root / "Occluded_Duke", n_ids=40, per_id=8, n_cams=8, seed=0)
    return root


def make_args(data_root, results, **over) -> argparse.Namespace:
    """Training arguments of a small from-scratch ResNet-18 run on a prepared synthetic dataset."""
    from toolkit import train_loop
    argv = ["--data_dir", str(data_root / "pytorch"), "--train_all", "--network_arch", "resnet18", "--no_pretrained",
            "--Epochs", "3", "--batchsize", "8", "--height", "64", "--width", "32", "--workers", "0", "--lr", "0.1",
            "--results_dir", str(results), "--name", "run"]
    args = train_loop.add_training_args(argparse.ArgumentParser()).parse_args(argv)
    vars(args).update(over)
    return args


TRAINED_RESNET18 = {"Epochs": 4, "height": 96, "width": 48}


@pytest.fixture(scope="session")
def trained_resnet18(synthetic_market, tmp_path_factory) -> Path:
    """net_last.pth of a ResNet-18 trained from scratch for 4 epochs at 96x48 on the synthetic Market:
    shared by the training test and the quantization test (which judges INT8 error on trained features)."""
    from toolkit import train_loop
    results = tmp_path_factory.mktemp("trained")
    args = make_args(synthetic_market, results, **TRAINED_RESNET18)
    train_loop.train(args)
    return results / "ft_resnet18" / "run" / "net_last.pth"


TINY_CFG = "transreid/configs/OCC_Duke/tiny.yml"


@pytest.fixture(scope="session")
def tiny_transreid_run(synthetic_occ_duke, tmp_path_factory) -> Path:
    """The tiny config trained 2 epochs on the synthetic Occluded-Duke (the start of the AMG tests too)."""
    out = tmp_path_factory.mktemp("transreid_run")
    r = run_script("-m transreid.train", "--config_file", TINY_CFG, "DATASETS.ROOT_DIR", synthetic_occ_duke,
                   "OUTPUT_DIR", out)
    assert r.returncode == 0, r.stderr
    return out


TINY_ATTN, TINY_HEAD = TINY_CFG.replace("tiny", "tiny_attn"), TINY_CFG.replace("tiny", "tiny_head")


@pytest.fixture(scope="session")
def amg_runs(tiny_transreid_run, synthetic_occ_duke, tmp_path_factory):
    """A token run from the trained tiny model, then a head run from its best.pth (heads after tokens)."""
    root = tmp_path_factory.mktemp("amg")
    data = ["DATASETS.ROOT_DIR", str(synthetic_occ_duke)]
    r = run_script("-m transreid.finetune", "--config_file", TINY_ATTN, *data, "FINETUNE.PRETRAIN_PATH",
                   tiny_transreid_run / "transformer_2.pth", "OUTPUT_DIR", root / "attn")
    assert r.returncode == 0, r.stderr
    r = run_script("-m transreid.finetune", "--config_file", TINY_HEAD, *data, "FINETUNE.PRETRAIN_PATH",
                   root / "attn" / "best.pth", "OUTPUT_DIR", root / "head")
    assert r.returncode == 0, r.stderr
    return root, data


def mistake_problems(cases: list[tuple], cwd: Path, env: dict | None, tmp_path: Path, timeout: int = 900) -> list[str]:
    """Run (name, script, argv, expected text) cases through tests/script_runner.py; the cases that did not
    end as one `error: ...` line (at most 300 characters, holding the expected text), exit status 2 and no
    traceback."""
    from toolkit.errors import MAX_MESSAGE
    spec = [{"script": script, "args": [str(a) for a in argv], "cwd": str(cwd), "env": env or {}}
            for _, script, argv, _ in cases]
    (tmp_path / "cases.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, str(ROOT / "tests" / "script_runner.py"), tmp_path / "cases.json",
                    tmp_path / "results.json"], check=True, timeout=timeout)
    problems = []
    for (name, _, _, expected), r in zip(cases, json.loads((tmp_path / "results.json").read_text())):
        lines = [line for line in r["stderr"].splitlines() if line.strip()]
        ok = (r["code"] == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r["stderr"]
              and len(lines[0]) <= len("error: ") + MAX_MESSAGE and (expected is None or expected in lines[0]))
        if not ok:
            problems.append(f"{name}: exit {r['code']}, stderr {r['stderr'][-600:]!r}")
    return problems
