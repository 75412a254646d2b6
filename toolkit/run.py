"""The run scaffold of every trainer (toolkit.train_loop for the re-ID scripts, classification.engine,
transreid.train, transreid.finetune): the run folder, the resume policy, the checkpointer and the
non-finite checks. A trainer keeps only its training step and schedule.

- A run folder is checked before anything is created: an existing run needs --resume (continue it) or
  --overwrite (replace it). A replacing run is written beside the old one and takes its place only once
  its first checkpoint is complete, so a failed start leaves the old run as it was; a new run that fails
  before its first checkpoint leaves no folder.
- --resume compares the options that define the run with the ones saved in it, paths resolved, and names
  the first difference; it reads the run's own resume file and nothing else.
- Checkpoints hold tensors and plain values only and are written atomically; every rank's RNG state is
  saved and given back to that rank.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from toolkit import distributed, utils
from toolkit.errors import UserError


class RunError(UserError):
    """A run that cannot start or go on: a folder it would overwrite, a resume that is another run, a
    non-finite loss or weight; printed as one line."""


def check_run_flags(resume: bool, overwrite: bool) -> None:
    """Checked first: a contradiction in the flags is reported before any file is read."""
    if resume and overwrite:
        raise RunError("--resume continues the run, --overwrite replaces it: give one")


def resolved(value: Any) -> Any:
    """A path as the same run sees it wherever it was typed from (`a//b`, `./a`, a symlink); other values
    unchanged. Comma-separated lists of paths (merged datasets) are resolved one by one."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        return value
    return ",".join(os.path.realpath(os.path.expanduser(p.strip())) for p in str(value).split(","))


def check_same_run(saved: Mapping[str, Any], asked: Mapping[str, Any], where: str | os.PathLike,
                   keys: Iterable[str] | None = None, free: tuple[str, ...] = (),
                   path_keys: tuple[str, ...] = ()) -> None:
    """--resume continues the run it names: the first run-defining option (`keys`, or every key of `asked`
    not starting with one of `free`) whose value differs from the saved one is an error."""
    for key in (keys if keys is not None else asked):
        if (free and key.startswith(free)) or key not in saved or key not in asked:
            continue
        now, then = asked[key], saved[key]
        if key in path_keys:
            now, then = resolved(now), resolved(then)
        if now != then:
            raise RunError(f"--resume: {key} is {asked[key]!r} but the run in {where} used {saved[key]!r}; resume "
                           "it with its own settings, or start a new run")


def _writable_ancestor(path: Path) -> Path:
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"the run folder {path} cannot be written ({existing} is "
                       f"{'not a folder' if not existing.is_dir() else 'read-only'})")
    return existing


class RunFolder:
    """The folder one run writes. Construct it with every flag, before anything is created: it checks
    that the folder may be written as asked. `start()` (rank 0, after all other checks) creates it,
    `commit()` after each complete checkpoint makes a replacing run the folder's only content, and
    `discard()` (on failure) removes what a run that never committed created."""

    def __init__(self, path: str | os.PathLike, *, resume: bool, overwrite: bool, markers: tuple[str, ...],
                 resume_file: str = "resume.pth", elsewhere: str = "choose another run folder",
                 inputs: Iterable[str | os.PathLike | None] = (), resume_hint: str = "pass --resume to continue it"):
        check_run_flags(resume, overwrite)
        self.final = Path(path)
        self.resume = resume
        self.resume_file = self.final / resume_file
        self.path = self.final
        self.started = self.committed = False
        self.created = False
        self.pending: list[tuple[str, str]] = []  # lines appended before the folder exists
        found = [f for pattern in markers for f in self.final.glob(pattern)] if self.final.is_dir() else []
        if resume:
            if not self.resume_file.is_file():
                raise RunError(f"--resume: {self.resume_file} does not exist (no run to continue)")
        elif found and not overwrite:
            raise RunError(f"{self.final} already holds a run ({found[0].name}): {resume_hint}, pass --overwrite to "
                           f"replace it, or {elsewhere}")
        self.replacing = not resume and self.final.is_dir() and any(self.final.iterdir())
        if self.replacing:
            inside = [p for p in inputs if p and _inside(Path(p), self.final)]
            if inside:
                raise RunError(f"--overwrite would delete {inside[0]}, an input of this run inside {self.final}: "
                               "copy it elsewhere first")
        if self.final.is_file():
            raise RunError(f"the run folder {self.final} is a file")
        _writable_ancestor(self.final if self.final.exists() else self.final.parent)

    @property
    def staging(self) -> Path:
        return self.final.parent / f".{self.final.name}.overwrite"

    def start(self) -> Path:
        """Create the folder the run writes into (rank 0 only); returns it."""
        if not distributed.is_main() or self.started:
            return self.path
        self.started = True
        if self.replacing:
            shutil.rmtree(self.staging, ignore_errors=True)  # left by a replacing run that was killed
            self.staging.mkdir(parents=True)
            self.path = self.staging
        elif not self.resume:
            self.created = not self.final.exists()
            self.final.mkdir(parents=True, exist_ok=True)
        for name, line in self.pending:
            self.append(name, line)
        self.pending = []
        return self.path

    def append(self, name: str, line: str) -> None:
        """Append a line to the run's text file `name` (a log); before `start` the line waits for the folder."""
        if not distributed.is_main():
            return
        if not self.started:
            self.pending.append((name, line))
            return
        with open(self.path / name, "a") as f:
            f.write(line + "\n")

    def commit(self) -> None:
        """A complete checkpoint is written: a replacing run now takes the old run's place."""
        if not distributed.is_main() or self.committed:
            return
        self.committed = True
        if self.path == self.final:
            return
        old = self.final.parent / f".{self.final.name}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(self.final, old)
        os.replace(self.staging, self.final)
        shutil.rmtree(old, ignore_errors=True)
        self.path = self.final

    def discard(self) -> None:
        """The run failed before its first checkpoint: remove what it created; an old run stays as it was."""
        if not distributed.is_main() or not self.started or self.committed:
            return
        if self.path == self.staging:
            shutil.rmtree(self.staging, ignore_errors=True)
        elif self.created:
            shutil.rmtree(self.final, ignore_errors=True)


def _inside(path: Path, folder: Path) -> bool:
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def gather_rng() -> list[dict]:
    """Every rank's RNG states, in rank order (a collective call: all ranks call it)."""
    return distributed.all_gather_object(utils.rng_state())


def restore_rng(states: list[dict] | dict) -> None:
    """This rank's saved RNG state (a file holding one state only gives it to every rank)."""
    if isinstance(states, dict):
        states = [states]
    rank = distributed.rank()
    utils.set_rng_state(states[rank] if rank < len(states) else states[0])


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """torch.save of tensors and plain values through a temporary file beside `path`."""
    utils.save_atomic(state, path)


def load_resume(path: str | os.PathLike, kind: str, required: tuple[str, ...]) -> dict:
    """A resume file of this kind of run (`kind` as `save_resume` wrote it), on the CPU; one-line errors for a
    missing, corrupt or foreign file, or one without the optimiser and epoch state a resume needs."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"--resume: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle that is not weights-only, ...
        raise RunError(f"--resume: {path} is corrupt or not a weights-only checkpoint ({type(e).__name__}); "
                       "pass --overwrite to start the run again") from None
    if not isinstance(state, dict):
        raise RunError(f"--resume: {path} is not a resume file")
    written_by = state.get("kind", kind)
    if written_by != kind:
        raise RunError(f"--resume: {path} is a resume file of {written_by}, not of {kind}")
    missing = [k for k in required if k not in state]
    if missing:
        raise RunError(f"--resume: {path} holds no {missing[0]!r}: not a resume file of {kind} (a file of weights "
                       "only cannot continue a run)")
    return state


def save_resume(state: dict, path: str | os.PathLike, kind: str) -> None:
    save_checkpoint({**state, "kind": kind}, path)


# ---------------------------------------------------------------------------------------------------------------
# non-finite numbers


def first_nonfinite(state: Any, prefix: str = "") -> str | None:
    """The name of the first floating-point tensor holding NaN or Inf in a (nested) state dict, else None."""
    if isinstance(state, torch.Tensor):
        return (prefix or "tensor") if state.is_floating_point() and not torch.isfinite(state).all() else None
    if isinstance(state, Mapping):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for key, value in items:
        found = first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return None


def check_finite_state(state: Any, what: str) -> None:
    """A checkpoint about to be scored, shrunk or fine-tuned: NaN/Inf weights are an error, not a result."""
    bad = first_nonfinite(state)
    if bad:
        raise RunError(f"{what}: {bad} holds NaN or infinite values (did its training diverge?); nothing was done "
                       "with it")


def check_finite_loss(value: float, where: str) -> None:
    if not math.isfinite(value):
        raise RunError(f"the loss is {value} at {where}: training diverged (try a lower learning rate); the last "
                       "good checkpoint is the previous epoch's, this epoch was not saved")


def check_finite_weights(net: nn.Module, where: str) -> None:
    bad = next((name for name, p in net.named_parameters() if not torch.isfinite(p).all()), None)
    if bad:
        raise RunError(f"the weights became NaN or infinite in {where} ({bad}): training diverged (try a lower "
                       "learning rate); nothing of it was saved")


def state_dict_mismatch(net: nn.Module, state: Mapping[str, Any]) -> str:
    """Why `state` does not load into `net`, in a few words: the first missing and unexpected keys (with their
    counts) and the first tensor whose shape differs."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    parts = [f"{label} {len(keys)} key(s) such as {', '.join(keys[:2])}"
             for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if shapes:
        k = shapes[0]
        parts.append(f"{k} is {list(state[k].shape)} in the file but {list(own[k].shape)} in the model"
                     + (f" (and {len(shapes) - 1} more shapes)" if len(shapes) > 1 else ""))
    return "; ".join(parts) or "the tensors do not load"
