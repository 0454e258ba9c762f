"""``cotune worker``: start a Celery worker on the cotune queues.

``run_worker(queues=("gpu", "cpu"), pool="solo", concurrency=1)`` is the same as
``celery -A workers.app worker -Q gpu,cpu --pool solo --concurrency 1 -l info``.

- A worker that consumes ``gpu`` runs engines and training in its own process: use the
  ``solo`` pool (or ``threads`` with concurrency 1). Prefork children are daemonic and may not
  start processes; several stages at once in one process would share one engine.
- ``cpu`` alone (finalize, reaper) takes any pool and concurrency.
- ``beat=True`` embeds the beat scheduler (the lease reaper every ``reaper_interval`` s) in this
  worker: fine for one machine; with several workers run one ``celery -A workers.app beat``.
- SIGTERM drains: Celery's warm shutdown lets the running task (one stage) finish, then exits;
  a second SIGTERM (or SIGQUIT) stops at once, and the stage's lease expires and is re-queued.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cotune.jobs.queues import CPU_QUEUE, GPU_QUEUE

POOLS = ("solo", "threads", "prefork")


def worker_argv(
    queues: Sequence[str] = (GPU_QUEUE, CPU_QUEUE),
    pool: str = "solo",
    concurrency: int = 1,
    *,
    loglevel: str = "info",
    beat: bool = False,
    hostname: str | None = None,
    schedule_filename: str | None = None,
) -> list[str]:
    """The ``celery worker`` arguments for these settings; ``ValueError`` if they do not fit."""
    queues = [q.strip() for q in queues if q.strip()]
    unknown = sorted(set(queues) - {GPU_QUEUE, CPU_QUEUE})
    if not queues or unknown:
        raise ValueError(f"queues must be among {GPU_QUEUE!r}, {CPU_QUEUE!r}; got {queues}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1; got {concurrency}")
    if GPU_QUEUE in queues and pool == "prefork":
        raise ValueError(
            "the gpu queue needs the solo or threads pool: vLLM and training run in-process, "
            "and prefork children are daemonic (they may not start processes)"
        )
    if GPU_QUEUE in queues and concurrency > 1:
        raise ValueError(
            "the gpu queue runs one stage at a time per process (one engine per base model); "
            "start more workers instead of raising concurrency"
        )
    argv = [
        "worker",
        "-Q",
        ",".join(queues),
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--loglevel",
        loglevel,
    ]
    if hostname:
        argv += ["--hostname", hostname]
    if beat:
        argv.append("--beat")
        if schedule_filename:
            argv += ["--schedule-filename", schedule_filename]
    return argv


def run_worker(
    queues: Sequence[str] = (GPU_QUEUE, CPU_QUEUE),
    pool: str = "solo",
    concurrency: int = 1,
    *,
    loglevel: str = "info",
    beat: bool = False,
    hostname: str | None = None,
    schedule_filename: str | None = None,
) -> int:
    """Run a worker in this process until it is shut down (SIGTERM drains, see above)."""
    argv = worker_argv(
        queues,
        pool,
        concurrency,
        loglevel=loglevel,
        beat=beat,
        hostname=hostname,
        schedule_filename=schedule_filename,
    )
    from workers.app import app

    app.worker_main(argv)
    return 0


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's options; shared by ``python -m workers.main`` and ``cotune worker``."""
    parser.add_argument("--queues", "-Q", default=f"{GPU_QUEUE},{CPU_QUEUE}")
    parser.add_argument("--pool", choices=POOLS, default="solo")
    parser.add_argument("--concurrency", "-c", type=int, default=1)
    parser.add_argument("--loglevel", "-l", default="info")
    parser.add_argument("--beat", "-B", action="store_true", help="also run the lease reaper")
    parser.add_argument("--hostname", "-n")


def run_from_args(args: argparse.Namespace) -> int:
    return run_worker(
        args.queues.split(","),
        args.pool,
        args.concurrency,
        loglevel=args.loglevel,
        beat=args.beat,
        hostname=args.hostname,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m workers.main [--queues gpu,cpu] [--pool solo] [--concurrency 1] [--beat]``."""
    parser = argparse.ArgumentParser(
        prog="cotune worker", description="Start a cotune Celery worker."
    )
    add_worker_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
