"""The one user-error base class and the one way every entry point reports a mistake: a single
`error: ...` line of at most 300 characters on stderr, exit status 2. No torch import here."""
from __future__ import annotations

import os
import pickle
import re
import sys
from typing import Any, Callable

MAX_MESSAGE = 300


class UserError(Exception):
    """A mistake of the user's or a bad input file: printed as one line, never as a traceback."""


def one_line(message: str) -> str:
    """The message itself when an error comes back from a DataLoader worker wrapped in its traceback; any
    other message joined into one line and cut to MAX_MESSAGE characters."""
    lines = [line for line in str(message).splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in str(message):
        name, _, text = lines[-1].partition(": ")  # "dataset_layout.DatasetError: cannot read ..."
        text = text if text and re.fullmatch(r"[\w.]+", name) else lines[-1]
    else:
        text = " ".join(line.strip() for line in lines)
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def fail(message: str, code: int = 2) -> None:
    """Print the one line and exit. Under torchrun every rank finds the same mistake (the checks run before
    the process group starts): rank 0 prints it, every rank exits with the same status."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


def runtime_message(e: RuntimeError) -> str | None:
    """What a RuntimeError from torch means to a user, for the ones that are not bugs: a full disk under
    torch.save, a DataLoader worker that died of a user error. None for anything else."""
    text = str(e)
    if "PytorchStreamWriter failed" in text or "No space left" in text or "file write failed" in text:
        return "writing a file failed: the disk is full or refused the write (torch.save: file write failed)"
    if "DataLoader worker" in text and "exited unexpectedly" in text:
        return ("a data-loading worker died (often: out of shared memory); try --workers 0 or a smaller batch "
                f"({text.splitlines()[0][:120]})")
    return None


def run_main(main: Callable[[Any], Any], args: Any, user_errors: tuple[type[Exception], ...] = ()) -> None:
    """Call main(args), turning user errors, the operating system's refusals (a read-only folder, a full
    disk), unreadable pickles and torch's disk-full and worker failures into one `error:` line, exit 2."""
    try:
        main(args)
    except (UserError,) + tuple(user_errors) as e:
        fail(str(e))
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        fail(f"{where}{e.strerror or e}")
    except pickle.UnpicklingError as e:  # torch's advice to load with weights_only=False is never repeated
        fail("a file could not be read safely: it holds more than tensors and plain values, so it was not "
             f"loaded ({type(e).__name__})")
    except RuntimeError as e:
        message = runtime_message(e)
        if message is None:
            raise
        fail(message)
    except KeyboardInterrupt:
        fail("interrupted", 130)
