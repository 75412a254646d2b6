"""Run command lines of the repository's scripts, each in its own process, cheaply.

    python tests/script_runner.py cases.json results.json    # a batch, two at a time
    python tests/script_runner.py --serve                     # one JSON case per stdin line, answers on stdout

Importing torch and torchvision costs about 5 s per process; here it is paid once, then every case runs
in a process forked from this clean parent (no torch operation has run in it, so no thread pool is
copied), as `python SCRIPT ARGS...` would run it: its own cwd, environment, argv, stdout, stderr and
exit status. Case: {"script" (a path, or "-m package.module"), "args", "cwd", "env", "timeout"};
result: {"code", "stdout", "stderr"}.
"""
import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy  # noqa: E402,F401
import scipy.io  # noqa: E402,F401
import torch  # noqa: E402,F401
import torchvision  # noqa: E402,F401

import classification.engine  # noqa: E402,F401
import classification.flags  # noqa: E402,F401
import evaluate_gpu  # noqa: E402,F401
import iterative_compress  # noqa: E402,F401
import test  # noqa: E402,F401
import transreid.amg  # noqa: E402,F401  (not the entry modules: run_module must import those itself)
import transreid.datasets  # noqa: E402,F401
import transreid.processor  # noqa: E402,F401
from toolkit import hooks, train_loop  # noqa: E402,F401


def child(case: dict, out: str, err: str) -> None:
    """In the forked process: become `python SCRIPT ARGS` and exit with its status."""
    code = 1
    try:
        os.chdir(case["cwd"])
        os.environ.update(case.get("env", {}))
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.path[0] = str(ROOT)
        if case["script"].startswith("-m "):  # python -m package.module
            module = case["script"][3:]
            sys.argv = [module, *case["args"]]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            script = str(ROOT / case["script"])
            sys.argv = [script, *case["args"]]
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def start(case: dict, tmp: str, i: int) -> tuple[int, str, str]:
    out, err = f"{tmp}/{i}.out", f"{tmp}/{i}.err"
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        child(case, out, err)
    return pid, out, err


def result(status: int, out: str, err: str) -> dict:
    return {"code": os.waitstatus_to_exitcode(status), "stdout": Path(out).read_text(errors="replace"),
            "stderr": Path(err).read_text(errors="replace")}


def run_batch(cases: list[dict]) -> list[dict]:
    results: list[dict | None] = [None] * len(cases)
    running: dict[int, tuple[int, str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(cases + [None]):
            while running and (case is None or len(running) >= 2):
                pid, status = os.wait()
                j, out, err = running.pop(pid)
                results[j] = result(status, out, err)
            if case is None:
                break
            pid, out, err = start(case, tmp, i)
            running[pid] = (i, out, err)
    return results


def serve() -> None:
    """Answer one case per line of stdin, in order, until stdin closes."""
    channel = os.fdopen(os.dup(1), "w")
    with tempfile.TemporaryDirectory() as tmp:
        for i, line in enumerate(sys.stdin):
            case = json.loads(line)
            pid, out, err = start(case, tmp, i)
            deadline = time.monotonic() + case.get("timeout", 600)
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                    break
                time.sleep(0.02)
            channel.write(json.dumps(result(status, out, err)) + "\n")
            channel.flush()


def main() -> None:
    if sys.argv[1:] == ["--serve"]:
        serve()
        return
    cases = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(run_batch(cases)))


if __name__ == "__main__":
    main()
