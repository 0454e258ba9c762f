"""What the user of ``cotune demo``, ``run`` and ``eval`` sees: cotune's own lines, not the
libraries'.

vLLM, torch and transformers print warnings and progress from Python and from C++ (the NUMA and
LD_PRELOAD advice, FutureWarnings, "CPU backend doesn't allow torch.set_num_threads"), straight
to file descriptors 1 and 2, so no logging setting silences all of them. ``quiet_output(log)``
points both descriptors at a log file while a command runs, and :func:`out` / :func:`err` are
streams on the terminal the descriptors had before: cotune's progress bars, stage lines and
tables go there. ``--verbose`` (no log file) leaves everything on the terminal.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

_streams: dict[str, TextIO] = {}


def out() -> TextIO:
    """The user's standard output (the terminal, also while library output goes to a log)."""
    return _streams.get("out", sys.stdout)


def err() -> TextIO:
    """The user's standard error: progress bars and stage lines."""
    return _streams.get("err", sys.stderr)


def say(message: str) -> None:
    """A progress line for the user."""
    print(message, file=err(), flush=True)


def _console(stream: TextIO, fd: int) -> tuple[TextIO, bool]:
    """A stream on what ``fd`` points at now; ``stream`` itself when it is not that descriptor
    (a test's capture object), since moving ``fd`` then does not move it."""
    try:
        if stream.fileno() == fd:
            copy = os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
            return copy, True
    except (OSError, ValueError, io.UnsupportedOperation):
        pass
    return stream, False


_active: list[Path] = []


@contextlib.contextmanager
def quiet_output(log_path: Path | None, *, announce: bool = False) -> Iterator[Path | None]:
    """Send everything written to descriptors 1 and 2 to ``log_path`` (appended) until the
    block ends; :func:`out` and :func:`err` keep writing to the terminal. ``None``: no change.
    Yields the log in effect (an enclosing block's, when nested); ``announce`` tells the user
    where it is. On an error the user is told where the library output went."""
    if log_path is None or _streams:
        active = _active[0] if _active else None
        if announce and active is not None:
            say(f"library output (vLLM, torch): {active}")
        yield active
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {1: os.dup(1), 2: os.dup(2)}
    console_out, own_out = _console(sys.stdout, 1)
    console_err, own_err = _console(sys.stderr, 2)
    _streams.update(out=console_out, err=console_err)
    _active.append(log_path)
    failed = False
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            if announce:
                say(f"library output (vLLM, torch): {log_path}")
            yield log_path
        except BaseException:
            failed = True
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            _streams.clear()
            _active.clear()
            for stream, own in ((console_out, own_out), (console_err, own_err)):
                stream.flush()
                if own:
                    stream.close()
            if failed:
                print(f"cotune: library output (vLLM, torch) is in {log_path}", file=sys.stderr)
