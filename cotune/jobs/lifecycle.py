"""A job's lifecycle, written once.

::

    create ──> validating_files ──validate──> queued ──advance──> running ──finalize──> succeeded
                     │                          │                   │  (one stage per call, or all)
                     └──────── fail / cancel ───┴─── fail / cancel ─┴──> failed | cancelled

Every status move and every lifecycle event of a job goes through ``Lifecycle``: the threads
of ``cotune serve --embedded`` (``cotune.jobs.threads``), the Celery tasks (``workers/tasks.py``)
and ``cotune run`` (``cotune.embedded``) call it and hold no transition logic of their own. The
store's transitions table (``cotune.store.status``) says which moves are legal; a move another
process already made is not an error here (``move`` answers False), so duplicate calls (a
redelivered message, a reaper's re-queue) are harmless.

Each step returns a ``Step`` that tells its caller what to do next: a Celery task enqueues the
next task, a thread runs on, the CLI raises the error it was given.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotune.errors import CotuneError

if TYPE_CHECKING:
    from cotune.records import JobReport
    from cotune.runner import JobContext
    from cotune.settings import Settings
    from cotune.spec.job import JobSpec
    from cotune.store import ArtifactStore, JobRecord, JobStore
    from cotune.store.accounts import AccountStore

log = logging.getLogger("cotune.jobs")

# The events a job's life writes, one home for their text (clients and tests read them).
CREATED = "job created; validating its files"
QUEUED = "files validated; queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
CANCEL_REQUESTED = "cancel requested"
CANCELLED = "cancelled between stages"
REQUEUED_AFTER_RESTART = "server restarted; re-queued"

Exporter = Callable[["JobContext", "JobReport"], None]


class Step(StrEnum):
    """What a lifecycle call did, so its caller knows what comes next."""

    queued = "queued"  # validate: files checked; run it (advance) next
    paused = "paused"  # advance: one stage done, more to come; advance again
    finished = "finished"  # advance: every stage done; finalize next
    succeeded = "succeeded"  # finalize: result written, job succeeded
    cancelled = "cancelled"
    failed = "failed"  # the job failed (Outcome.error holds why)
    held = "held"  # another live worker holds the next stage: its own chain carries the job
    skipped = "skipped"  # nothing to do: no such job, already terminal, or not its turn


@dataclass
class Outcome:
    step: Step
    report: JobReport | None = None  # finished with every stage run here (no stage limit)
    error: BaseException | None = None  # failed: the exception that failed the job
    context: JobContext | None = None  # the context the stages ran in (finalize reuses it)


@dataclass
class Lifecycle:
    """A job's moves over one job store and artifact store.

    ``accounts``: where a tenant's files are looked up (jobs created over HTTP name file ids);
    None for jobs whose spec holds local paths (``cotune run``, ``cotune submit`` to Celery).
    ``context_options``: extra ``JobContext`` fields (tests pass scripted engines and a
    trainer; the CLI its progress bars). ``workdir``: where a job's files are materialised,
    ``settings.work_dir()/<job_id>`` by default.
    """

    store: JobStore
    artifacts: ArtifactStore
    settings: Settings
    accounts: AccountStore | None = None
    context_options: Mapping[str, Any] = field(default_factory=dict)
    keep_workdir: bool = False

    # -- events and moves ---------------------------------------------------------------------

    def event(self, job_id: str, message: str, level: str = "info", **data: Any) -> None:
        from cotune.records import Event

        try:
            self.store.add_event(
                job_id, Event(level=level, message=message, data=data, created_at=time.time())
            )
        except CotuneError as err:  # the job was deleted meanwhile
            log.info("event not stored: %s", err, extra={"job_id": job_id})

    def move(
        self,
        job_id: str,
        to: str,
        error: str | None = None,
        *,
        only_from: str | None = None,
        event: str | None = None,
        level: str = "info",
    ) -> bool:
        """Move the job to ``to`` (from ``only_from``, when given), with its ``event`` in the
        same transaction (a reader that sees the new status sees the event too); False (and no
        error) if it cannot go there from where it is now, e.g. another process moved it first."""
        from cotune.records import Event
        from cotune.store import IllegalTransition, JobNotFound, JobStatus

        try:
            self.store.transition(
                job_id,
                JobStatus(to),
                error=error,
                only_from=None if only_from is None else JobStatus(only_from),
                event=None
                if event is None
                else Event(level=level, message=event, created_at=time.time()),
            )
        except (IllegalTransition, JobNotFound) as err:
            log.info("job not moved to %s: %s", to, err, extra={"job_id": job_id})
            return False
        log.info("job %s", to, extra={"job_id": job_id, "status": to})
        return True

    def public(self, err: BaseException) -> str:
        """The error as the API may show it: server folders replaced by ``<server>``."""
        from cotune.jobs.results import redact, server_roots

        text = f"{type(err).__name__}: {err}"
        return redact(text, server_roots(self.settings, self.artifacts)) or text

    # -- the steps ----------------------------------------------------------------------------

    def create(
        self,
        name: str,
        spec: dict[str, Any],
        *,
        tenant_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """A new job in ``validating_files``, with its first event (once, even when an
        ``idempotency_key`` returns an existing job)."""
        from cotune.store import JobStatus

        job_id = self.store.create_job(
            name,
            spec,
            tenant_id=tenant_id,
            status=JobStatus.validating_files,
            idempotency_key=idempotency_key,
        )
        record = self.store.get_job(job_id)
        if (
            record is not None
            and record.status == JobStatus.validating_files
            and not self.store.events(job_id, limit=1)
        ):
            self.event(job_id, CREATED)
        return job_id

    def dispatch_failed(self, job_id: str) -> None:
        """The job could not be handed to a runner: it fails (if nothing took it meanwhile)."""
        from cotune.store import JobStatus

        record = self.store.get_job(job_id)
        if record is not None and record.status == JobStatus.validating_files:
            message = "the job could not be queued; submit it again"
            self.move(
                job_id,
                "failed",
                error=message,
                only_from="validating_files",
                event=f"failed: {message}",
                level="error",
            )

    def request_cancel(self, job_id: str) -> JobRecord:
        """Ask the job to stop (``JobStore.request_cancel``), with one event the first time
        (in the same transaction)."""
        from cotune.records import Event

        event = Event(level="warning", message=CANCEL_REQUESTED, created_at=time.time())
        return self.store.request_cancel(job_id, event=event)

    def validate(
        self, job_id: str, owner: str, *, check_models: bool = False, job: JobSpec | None = None
    ) -> Outcome:
        """``validating_files`` -> ``queued``: the job's files materialise (present, SHA-256
        as uploaded) and, with ``check_models``, its models resolve on this machine (a runner
        that validates where it runs; a Celery cpu worker may not hold the models: the gpu
        worker's first stage then names a missing one)."""
        from cotune.store import JobStatus

        record = self.store.get_job(job_id)
        if record is None or record.status != JobStatus.validating_files:
            return Outcome(Step.skipped)
        try:
            job = job if job is not None else self.load_spec(record)
            if check_models:
                from cotune.jobs.materialize import check_models_prepared

                check_models_prepared(job, self.settings)
        except Exception as err:
            return Outcome(self.fail(job_id, owner, err), error=err)
        if not self.move(job_id, "queued", only_from="validating_files", event=QUEUED):
            self.cleanup(job_id)
            return Outcome(Step.skipped)  # cancelled meanwhile, or a duplicate call won
        return Outcome(Step.queued)

    def requeue(self, job_id: str, message: str = REQUEUED_AFTER_RESTART) -> bool:
        """A ``running`` job whose runner is gone goes back to ``queued``."""
        return self.move(job_id, "queued", only_from="running", event=message, level="warning")

    def resume(self, job_id: str) -> bool:
        """A failed job goes back to ``queued`` for its owner to run it on from its last
        finished stage (``cotune run --resume``)."""
        return self.move(job_id, "queued", only_from="failed")

    def start(self, job_id: str) -> JobRecord | None:
        """The job if a runner should work on it now (``running``, moved from ``queued``);
        None if it is missing, terminal, not validated yet, or cancelled here."""
        from cotune.store import JobStatus
        from cotune.store.status import TERMINAL

        record = self.store.get_job(job_id)
        if record is None or record.status in TERMINAL:
            return None
        if record.status == JobStatus.validating_files:
            log.warning("its files are not validated yet", extra={"job_id": job_id})
            return None
        if record.cancel_requested:
            self.cancel(job_id)
            return None
        if record.status == JobStatus.queued:
            self.move(job_id, "running", only_from="queued", event=RUNNING)
        record = self.store.get_job(job_id)
        return record if record is not None and record.status == JobStatus.running else None

    def advance(
        self,
        job_id: str,
        owner: str,
        *,
        stage_limit: int | None = None,
        job: JobSpec | None = None,
    ) -> Outcome:
        """Run the job's next ``stage_limit`` stages (all of them with None) under ``owner``'s
        leases: ``paused`` (more to come), ``finished`` (every stage done; ``report`` set when
        no limit stopped it), ``cancelled``, ``held`` or ``failed``."""
        from cotune.loop import JobCancelled, run_job
        from cotune.runner import StageBusy, StagePause

        record = self.start(job_id)
        if record is None:
            return Outcome(Step.skipped)
        try:
            ctx = self.context(record, owner, stage_limit=stage_limit, job=job)
            report = run_job(ctx)
        except StagePause as pause:
            if self.store.cancel_requested(job_id):
                return Outcome(self.cancel(job_id))
            log.info("next: epoch %d %s", pause.epoch, pause.stage.value, extra={"job_id": job_id})
            return Outcome(Step.paused)
        except JobCancelled:
            return Outcome(self.cancel(job_id))
        except Exception as err:
            if isinstance(err, StageBusy) and self._held_elsewhere(job_id, owner):
                # A duplicate message: the holder's own task chain carries the job on.
                return Outcome(Step.held)
            return Outcome(self.fail(job_id, owner, err), error=err)
        return Outcome(Step.finished, report=report, context=ctx)

    def finalize(
        self,
        job_id: str,
        owner: str,
        *,
        done: Outcome | None = None,
        export: Exporter | None = None,
    ) -> Outcome:
        """Write the result (``export``, default: ``<job_id>/result/`` in the artifact store),
        store the report as the job's result and succeed. ``done`` is ``advance``'s finished
        outcome when the stages ran in this call's process; otherwise the report is rebuilt
        from the stored stages (``paused`` if one is still missing)."""
        from cotune.jobs.results import export_job_result
        from cotune.loop import run_job
        from cotune.runner import StagePause

        if done is None or done.report is None or done.context is None:
            record = self.start(job_id)
            if record is None:
                return Outcome(Step.skipped)
            try:
                # stage_limit=0: every stage must be done; only stored outputs are read.
                ctx = self.context(record, owner, stage_limit=0)
                report = run_job(ctx)
            except StagePause:
                return Outcome(Step.paused)  # not finished after all: advance it
            except Exception as err:
                return Outcome(self.fail(job_id, owner, err), error=err)
        else:
            ctx, report = done.context, done.report
        try:
            (export or export_job_result)(ctx, report)
            self.store.set_result(job_id, report.model_dump(mode="json"))
        except Exception as err:
            return Outcome(self.fail(job_id, owner, err), error=err)
        self.move(job_id, "succeeded", event=SUCCEEDED)
        self.cleanup(job_id)
        return Outcome(Step.succeeded, report=report, context=ctx)

    def delete(self, job_id: str) -> bool:
        """Delete a finished job: its artifacts, its rows and this machine's copy of its files
        (the caller checks it is finished: deleting a running job would strand its runner)."""
        self.artifacts.delete(job_id)
        deleted = self.store.delete_job(job_id)
        shutil.rmtree(self.workdir(job_id), ignore_errors=True)
        return deleted

    def cancel(self, job_id: str) -> Step:
        self.move(job_id, "cancelled", event=CANCELLED, level="warning")
        self.cleanup(job_id)
        return Step.cancelled

    def fail(self, job_id: str, owner: str, err: BaseException) -> Step:
        """Fail the stage ``owner`` was running (if any) and the job, with the error."""
        from cotune.store import StageStatus

        message = self.public(err)
        for state in self.store.stage_states(job_id):
            if state.status == StageStatus.running and state.lease_owner == owner:
                self.store.fail_stage(
                    job_id, state.epoch, state.stage, owner, message, component=state.component
                )
        self.move(job_id, "failed", error=message, event=f"failed: {message}", level="error")
        log.warning("job failed: %s", message, extra={"job_id": job_id})
        self.cleanup(job_id)
        return Step.failed

    # -- the parts ----------------------------------------------------------------------------

    def workdir(self, job_id: str) -> Path:
        return self.settings.work_dir() / job_id

    def load_spec(self, record: JobRecord) -> JobSpec:
        """The stored job's runnable spec: a tenant's job (file ids) is materialised into its
        work folder; a job without a tenant already holds local paths."""
        from cotune.jobs.materialize import load_record_spec

        return load_record_spec(
            record, self.accounts, self.artifacts, self.settings, self.workdir(record.id)
        )

    def context(
        self,
        record: JobRecord,
        owner: str,
        *,
        stage_limit: int | None = None,
        job: JobSpec | None = None,
    ) -> JobContext:
        from cotune.runner import JobContext

        return JobContext(
            job_id=record.id,
            job=job if job is not None else self.load_spec(record),
            store=self.store,
            artifacts=self.artifacts,
            owner=owner,
            lease_seconds=self.settings.lease_seconds,
            settings=self.settings,
            stage_limit=stage_limit,
            **dict(self.context_options),
        )

    def cleanup(self, job_id: str) -> None:
        """Drop this machine's copy of the job's files (a cache of the artifact store)."""
        if not self.keep_workdir:
            shutil.rmtree(self.workdir(job_id), ignore_errors=True)

    def _held_elsewhere(self, job_id: str, owner: str) -> bool:
        """Whether a stage of the job runs under another owner's live lease."""
        from cotune.store import StageStatus

        now = datetime.now(UTC)
        return any(
            s.status == StageStatus.running
            and s.lease_owner != owner
            and s.lease_expires_at is not None
            and s.lease_expires_at > now
            for s in self.store.stage_states(job_id)
        )


def unfinished_jobs(store: JobStore) -> list[JobRecord]:
    """Every job not yet terminal, oldest first (a restarting runner picks them up)."""
    from cotune.store.status import TERMINAL

    found: list[JobRecord] = []
    after = None
    while True:
        page = store.list_jobs(None, after=after, limit=100)
        found += [r for r in page.data if r.status not in TERMINAL]
        if not page.has_more or not page.data:
            break
        after = page.data[-1].id
    return list(reversed(found))
