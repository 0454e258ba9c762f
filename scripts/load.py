"""Many clients polling a running job, then the API stopped with SIGTERM under that load.

    python scripts/load.py --clients 50 --seconds 60

What it does: a fresh PostgreSQL database and Redis key prefix, Celery beat and one worker
(``scripts/fleet.py``), the API as it is deployed (``uvicorn services.api.app:create_app
--factory``, one process), and the tiny kb-qa job submitted to it. While the job runs,
``--clients`` threads each hold their own API key of one tenant and poll as a dashboard or the
SDK would: the job, then its events after the last one seen, every ``--interval`` seconds, for
``--seconds``. Then the API gets SIGTERM while they still poll: requests it had accepted must
be answered (uvicorn's graceful shutdown), later ones are refused at connect. It prints the
latency of each kind of request (p50, p99, max), the answers by status, and what broke during
the shutdown. Nothing here is asserted by the test suite: the numbers go to
docs/reliability.md with the command.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from fleet import Fleet, fleet_env, free_port, pg_database, wait_for_port  # noqa: E402


class Client(threading.Thread):
    def __init__(self, base: str, key: str, job_id: str, interval: float, stop: threading.Event):
        super().__init__(daemon=True)
        self.base, self.key, self.job_id, self.interval, self.stop = (
            base,
            key,
            job_id,
            interval,
            stop,
        )
        self.samples: list[tuple[str, float, int | str, float]] = []  # kind, seconds, status, at

    def run(self) -> None:
        import httpx

        after = ""
        with httpx.Client(
            base_url=self.base, headers={"Authorization": f"Bearer {self.key}"}, timeout=30
        ) as http:
            while not self.stop.is_set():
                for kind, path in [
                    ("job", f"/v1/jobs/{self.job_id}"),
                    ("events", f"/v1/jobs/{self.job_id}/events?limit=50{after}"),
                ]:
                    start = time.monotonic()
                    try:
                        response = http.get(path)
                        status: int | str = response.status_code
                        if kind == "events" and response.status_code == 200:
                            data = response.json()["data"]
                            after = f"&after={data[-1]['id']}" if data else after
                    except httpx.ConnectError:
                        status = "refused"
                    except httpx.HTTPError as err:
                        status = type(err).__name__
                    self.samples.append((kind, time.monotonic() - start, status, start))
                self.stop.wait(self.interval)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def run(args: argparse.Namespace) -> int:
    import httpx

    from cotune.models import prepare_model
    from cotune.store.accounts import AccountStore
    from cotune.tiny import TINY_SYSTEM, upload_tiny_example, write_tiny_example

    folder = Path(tempfile.mkdtemp(prefix="cotune-load-"))
    prepare_model("tiny", progress=print)
    example = write_tiny_example(folder / "tiny-kb")
    url = pg_database(args.pg)
    env = fleet_env(url, args.redis, folder)
    accounts = AccountStore(url)
    keys = [accounts.create_key("load", name=f"client-{i}")[1] for i in range(args.clients)]
    fleet = Fleet(env, folder)
    port = free_port()
    api_log = open(folder / "api.log", "wb")  # noqa: SIM115 - kept by Popen
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "services.api.app:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=REPO, env=env, stdout=api_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    clients: list[Client] = []
    try:
        fleet.beat()
        fleet.worker()
        wait_for_port(port)
        owner = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {keys[0]}"})

        def upload(name: str, content: bytes, purpose: str) -> str:
            answer = owner.post(
                "/v1/files", files={"file": (name, content)}, data={"purpose": purpose}
            )
            answer.raise_for_status()
            return str(answer.json()["id"])

        ids = upload_tiny_example(example, upload)

        system = {**TINY_SYSTEM, "components": [dict(c) for c in TINY_SYSTEM["components"]]}
        system["components"][1]["args"] = {
            **system["components"][1]["args"],
            "corpus": ids["corpus"],
        }
        job = owner.post(
            "/v1/jobs",
            json={
                "system": system,
                "data": {"train": ids["train"], "val": ids["val"], "test": ids["test"]},
                "loop": {"epochs": 2, "rollout_batch": 16, "samples_per_component": 24},
            },
        )
        job.raise_for_status()
        job_id = job.json()["id"]
        print(f"job {job_id} submitted; {args.clients} clients poll for {args.seconds:.0f} s")
        clients = [Client(base, k, job_id, args.interval, stop) for k in keys]
        for client in clients:
            client.start()
        time.sleep(args.seconds)
        sigterm_at = time.monotonic()
        api.send_signal(signal.SIGTERM)
        api_exit = api.wait(timeout=60)
        time.sleep(1.0)
        stop.set()
        for client in clients:
            client.join(timeout=60)
    finally:
        stop.set()
        if api.poll() is None:
            api.kill()
        fleet.stop()
    report(args, clients, sigterm_at, api_exit)
    return 0


def report(args: argparse.Namespace, clients: list[Any], sigterm_at: float, api_exit: int) -> None:
    before = [s for c in clients for s in c.samples if s[3] < sigterm_at]
    during = [s for c in clients for s in c.samples if s[3] >= sigterm_at]
    lines = [
        f"## load: {args.clients} clients, one poll (job + events) every {args.interval} s each, "
        f"{args.seconds:.0f} s, then SIGTERM to the API",
        "",
        "| request | count | p50 (ms) | p99 (ms) | max (ms) | answers |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind in ("job", "events"):
        rows = [s for s in before if s[0] == kind]
        times = [s[1] * 1000 for s in rows]
        statuses = collections.Counter(str(s[2]) for s in rows)
        lines.append(
            f"| {kind} | {len(rows)} | {statistics.median(times) if times else 0:.0f} | "
            f"{percentile(times, 0.99):.0f} | {max(times, default=0):.0f} | "
            f"{', '.join(f'{k}: {v}' for k, v in sorted(statuses.items()))} |"
        )
    errors = sum(1 for s in before if s[2] != 200)
    shutdown = collections.Counter(str(s[2]) for s in during)
    broken = sum(n for k, n in shutdown.items() if k not in ("200", "refused"))
    lines += [
        "",
        f"- before the SIGTERM: {len(before)} requests, {errors} not 200",
        f"- after the SIGTERM: {dict(shutdown)}; broken answers (neither 200 nor refused at "
        f"connect): {broken}; the API exited with status {api_exit} (uvicorn finishes what it "
        "accepted, then re-raises the signal: -15 is its graceful exit)",
    ]
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    parser.add_argument(
        "--pg",
        default=os.environ.get(
            "COTUNE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
