"""Jobs run in this process's threads (``cotune serve --embedded``), through the one lifecycle
(``cotune.jobs.lifecycle``)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from cotune.jobs.lifecycle import Lifecycle, Step, unfinished_jobs

if TYPE_CHECKING:
    from cotune.records import StageRecord
    from cotune.settings import Settings
    from cotune.store import ArtifactStore, JobStore
    from cotune.store.accounts import AccountStore

log = logging.getLogger("cotune.jobs")


class Dispatcher(Protocol):
    """How the API hands a job over to be run.

    ``dispatch(job_id)`` takes a job the API just created in ``validating_files`` and owns its
    status from then on: ``queued`` once its files are materialised and it is in the queue,
    then ``running`` and a terminal status (or ``failed`` with an error if it cannot start).
    It must be idempotent (a duplicate call for one job does nothing more) and return quickly.
    ``queue_depth()`` is the number of jobs waiting to run, or None if unknown.
    """

    def dispatch(self, job_id: str) -> None: ...

    def queue_depth(self) -> int | None: ...


class ThreadDispatcher:
    """Runs jobs in this process's threads with ``cotune.loop.run_job`` (``cotune serve
    --embedded``): a validation pool materialises each job's files and checks its models
    (``validating_files`` -> ``queued``), then a run pool of ``workers`` threads (one by
    default: engines are cached per process and one job uses the accelerator at a time) runs
    it (``running`` -> ``succeeded`` / ``failed`` / ``cancelled``).

    ``context_options``: extra ``JobContext`` fields (tests pass scripted engines and a
    trainer). ``on_stage_done``: called with each finished stage's record (metrics).
    """

    def __init__(
        self,
        store: JobStore,
        accounts: AccountStore | None,
        artifacts: ArtifactStore,
        settings: Settings,
        *,
        workers: int = 1,
        context_options: Mapping[str, Any] | None = None,
        on_stage_done: Callable[[StageRecord], None] | None = None,
        keep_workdir: bool = False,
    ) -> None:
        options = dict(context_options or {})
        if on_stage_done is not None:
            options.setdefault("on_stage_done", on_stage_done)
        self.lifecycle = Lifecycle(
            store,
            artifacts,
            settings,
            accounts=accounts,
            context_options=options,
            keep_workdir=keep_workdir,
        )
        self.store = store
        # One embedded server per host and database: a restarted process takes its own
        # stages' leases over at once (``recover``) instead of waiting for them to expire.
        self.owner = f"thread:{socket.gethostname()}"
        self._validate = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cotune-validate")
        self._run = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cotune-run")
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._waiting = 0
        self._idle = threading.Condition(self._lock)
        self._busy = 0

    # -- the protocol

    def dispatch(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._seen:
                return
            self._seen.add(job_id)
            self._busy += 1
        self._validate.submit(self._guard, self._validate_job, job_id)

    def queue_depth(self) -> int | None:
        with self._lock:
            return self._waiting

    def recover(self) -> list[str]:
        """Dispatch again the jobs a previous process left unfinished (an embedded server
        restarting): running ones go back to ``queued`` and resume from their last finished
        stage. Call it once at start-up, only where this dispatcher is the only runner."""
        from cotune.store import JobStatus

        unfinished = unfinished_jobs(self.store)
        for record in unfinished:
            if record.status == JobStatus.running:
                self.lifecycle.requeue(record.id)
            self.dispatch(record.id)
        return [r.id for r in unfinished]

    # -- waiting

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every dispatched job has finished (tests, shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def shutdown(self, wait: bool = False) -> None:
        self._validate.shutdown(wait=wait, cancel_futures=not wait)
        self._run.shutdown(wait=wait, cancel_futures=not wait)

    # -- the work

    def _guard(self, work: Callable[..., bool], *args: Any) -> None:
        """Run ``work``; unless it handed the job on (True), the job is no longer busy here."""
        handed_on = False
        try:
            handed_on = work(*args)
        except BaseException:  # pragma: no cover - the lifecycle catches the job's errors
            log.exception("dispatcher step failed", extra={"job_id": args[0] if args else None})
        finally:
            if not handed_on:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _validate_job(self, job_id: str) -> bool:
        """``validating_files`` -> ``queued`` (models checked here: this process runs the
        job); a job already queued (recovered) goes straight to the run pool."""
        from cotune.store import JobStatus

        record = self.store.get_job(job_id)
        if record is None:
            return False
        if record.status == JobStatus.validating_files:
            checked = self.lifecycle.validate(job_id, self.owner, check_models=True)
            if checked.step != Step.queued:
                return False
        elif record.status != JobStatus.queued:
            return False
        with self._lock:
            self._waiting += 1
        self._run.submit(self._guard, self._run_job, job_id)
        return True

    def _run_job(self, job_id: str) -> bool:
        with self._lock:
            self._waiting -= 1
        try:
            done = self.lifecycle.advance(job_id, self.owner)
            if done.step == Step.finished:
                self.lifecycle.finalize(job_id, self.owner, done=done)
        finally:
            self.lifecycle.cleanup(job_id)
        return False
