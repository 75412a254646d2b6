"""Command-line plumbing shared by every script, without torch (evaluate_gpu.py and the prepare
scripts stay fast): a parser whose mistakes are one `error: ...` line, checked number types, and
the wrapper that turns expected user errors into that same line with exit status 2.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from toolkit import errors
from toolkit.errors import UserError, one_line  # noqa: F401  (re-exported)


class UsageError(UserError):
    """A flag, or a combination of flags, that asks for something this tool will not do."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) instead of the usage block; a module run with `python -m`
    shows that command in its usage, not the file name."""

    def __init__(self, *args: Any, **kwargs: Any):
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if "prog" not in kwargs and spec is not None and "." in (spec.name or ""):
            kwargs["prog"] = f"python -m {spec.name}"
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        fail(f"{message} (see {self.prog} --help)")


def _number(kind: type, low: float | None, high: float | None, low_open: bool = False, high_open: bool = False,
            what: str = "") -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, 0, None, low_open=True, what="an integer >= 1")
nonnegative_int = _number(int, 0, None, what="an integer >= 0")
positive_float = _number(float, 0, None, low_open=True, what="a number > 0")
nonnegative_float = _number(float, 0, None, what="a number >= 0")
probability = _number(float, 0, 1, what="a number in [0, 1]")
prune_fraction = _number(float, 0, 1, high_open=True, what="a fraction in [0, 1)")
keep_fraction = _number(float, 0, 1, low_open=True, what="a fraction in (0, 1]")


def positive_int_list(text: str) -> list[int]:
    """'40,60' -> [40, 60]; '' -> []."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1 such as 40,60, got {text!r}")
    return [int(p) for p in parts]


positive_int_list.__name__ = "integer list"


def refuse_existing_output(out: Path, overwrite: bool, resume: bool, resume_means: str) -> None:
    """An output folder that already holds results is written into only with --overwrite or --resume."""
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise UsageError(f"{out} already holds results: pass --overwrite to replace them, --resume to "
                         f"{resume_means}, or choose another --out")


def check_outputs(outputs: dict[str, str | os.PathLike | None], inputs: dict[str, str | os.PathLike | None],
                  overwrite: bool) -> None:
    """Output files ({flag: path}, None for one not asked for): none may name one of the command's inputs
    ({flag: path}) or a folder, and an existing one is replaced only with --overwrite. Checked before anything
    is computed."""
    sources = {os.path.realpath(path): flag for flag, path in inputs.items() if path}
    for flag, out in outputs.items():
        if out is None:
            continue
        if os.path.realpath(out) in sources:
            raise UsageError(f"{flag} {out} is {sources[os.path.realpath(out)]}, an input of this command")
        if Path(out).is_dir():
            raise UsageError(f"{flag} {out} is a folder")
        if Path(out).exists() and not overwrite:
            raise UsageError(f"{flag} {out} already exists: pass --overwrite to replace it")


def fail(message: str, code: int = 2) -> None:
    """Stop a script with a one-line error (a user mistake is not a traceback)."""
    errors.fail(message, code)


def run_main(main: Callable[[Any], Any], args: Any, user_errors: tuple[type[Exception], ...] = ()) -> None:
    """toolkit.errors.run_main: every UserError (and `user_errors`) becomes one `error:` line, exit 2."""
    errors.run_main(main, args, user_errors)
