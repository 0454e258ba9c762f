"""A small cotune fleet as subprocesses, for the chaos script and the reliability tests.

- ``Fleet``: Celery beat (the reaper) and workers, each in its own process group, so that a
  kill takes the whole worker (vLLM included) as a crash would.
- ``RedisServer`` and ``PostgresServer``: second instances on free ports, in folders of their
  own, so a test can stop and restart them without touching the machine's own services.
  PostgreSQL refuses to run as root: it runs as the ``postgres`` user (``runuser``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROCESS_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": "2",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def pg_database(admin_url: str) -> str:
    """A new database on the server of ``admin_url``, migrated to head; its URL."""
    from cotune.store import create_database

    return create_database(admin_url, "cotune_fleet")


def fleet_env(database_url: str, broker_url: str, folder: Path) -> dict[str, str]:
    """The environment of a fleet's processes: its own database, broker key prefix and
    artifact store; the default lease, reaper and stall settings (what is measured)."""
    env = {
        **os.environ,
        **PROCESS_ENV,
        "COTUNE_DATABASE_URL": database_url,
        "COTUNE_BROKER_URL": broker_url,
        "COTUNE_BROKER_KEY_PREFIX": f"cotune-fleet-{uuid.uuid4().hex[:8]}:",
        "COTUNE_ARTIFACTS": str(folder / "artifacts"),
        "COTUNE_WORKDIR": str(folder / "work"),
        "PYTHONPATH": str(REPO),
    }
    for name in ("COTUNE_LEASE_SECONDS", "COTUNE_REAPER_INTERVAL", "COTUNE_STALL_SECONDS"):
        env.pop(name, None)
    return env


def holder_pid(owner: str | None) -> int | None:
    """A worker's lease owner is ``host:pid:task``."""
    parts = (owner or "").split(":")
    return int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None


class Fleet:
    """Beat and workers as subprocesses of this process, each in its own process group."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.env, self.folder = env, folder
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.count = 0

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        self.count += 1
        log = open(self.folder / f"proc-{self.count}.log", "wb")  # noqa: SIM115 - kept by Popen
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", *args],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[proc.pid] = proc
        return proc

    def beat(self) -> subprocess.Popen[bytes]:
        return self.start("beat", "--schedule", str(self.folder / "beat"), "-l", "info")

    def worker(self) -> subprocess.Popen[bytes]:
        n = self.count
        return self.start(
            "worker", "-Q", "gpu,cpu", "--pool", "solo", "-n", f"fleet{n}@%h", "-l", "info",
            "--without-gossip", "--without-mingle",
        )  # fmt: skip

    def kill(self, pid: int) -> None:
        os.killpg(pid, signal.SIGKILL)
        self.procs.pop(pid).wait(timeout=30)

    def terminate(self, pid: int, timeout: float) -> int:
        """SIGTERM (a warm shutdown: Celery finishes the task it holds); its exit status."""
        proc = self.procs[pid]
        os.kill(pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # what the warm shutdown left (none expected)
            self.procs.pop(pid)
        return code

    def stop(self) -> None:
        for pid in list(self.procs):
            with contextlib.suppress(ProcessLookupError):
                self.kill(pid)


class RedisServer:
    """A second Redis, no persistence (a restart loses every message, the hard case)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)
            self.proc = None


class PostgresServer:
    """A second PostgreSQL cluster in a folder of its own, run as the ``postgres`` user."""

    def __init__(self) -> None:
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="cotune-pg-"))
        self.data = self.folder / "data"
        self.folder.chmod(0o755)
        shutil.chown(self.folder, "postgres")
        self._as_postgres("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *command],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def start(self) -> None:
        self._as_postgres(
            "pg_ctl", "-D", str(self.data), "-l", str(self.folder / "log"), "-w", "start",
            "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1",
        )  # fmt: skip
        wait_for_port(self.port)

    def stop(self) -> None:
        """As a crash would: no checkpoint, every connection cut."""
        self._as_postgres("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
