"""Job and stage status names and the transitions between them: the store refuses any move
these tables do not allow (``JobStore.transition`` for jobs, the stage methods for stages)."""

from __future__ import annotations

from enum import StrEnum

from cotune.errors import CotuneError


class JobStatus(StrEnum):
    validating_files = "validating_files"
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TRANSITIONS: dict[JobStatus, set[JobStatus]] = {
    JobStatus.validating_files: {JobStatus.queued, JobStatus.failed, JobStatus.cancelled},
    JobStatus.queued: {JobStatus.running, JobStatus.cancelled, JobStatus.failed},
    # running -> queued: re-queued after its worker was lost.
    JobStatus.running: {
        JobStatus.succeeded,
        JobStatus.failed,
        JobStatus.cancelled,
        JobStatus.queued,
    },
    JobStatus.succeeded: set(),
    # failed -> queued: only its owner resuming it (``cotune run --resume``); no API route and
    # no worker makes this move.
    JobStatus.failed: {JobStatus.queued},
    JobStatus.cancelled: set(),
}

# A job no runner works on any more (a failed one stays failed unless its owner resumes it).
TERMINAL: frozenset[JobStatus] = frozenset(
    {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}
)


class IllegalTransition(CotuneError):
    """A job cannot move from its current status to the requested one (the API answers 409)."""

    code = "illegal_transition"

    def __init__(
        self, from_status: JobStatus | str, to_status: JobStatus | str, job_id: str | None = None
    ) -> None:
        self.from_status = JobStatus(from_status)
        self.to_status = JobStatus(to_status)
        self.job_id = job_id
        who = f"job {job_id}" if job_id else "a job"
        self.message = f"cannot move {who} from {self.from_status.value} to {self.to_status.value}"
        super().__init__(self.message)


class JobNotFound(CotuneError, LookupError):
    """No job with this id (or not one the caller's tenant may see; the API answers 404)."""

    code = "not_found"

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.message = f"no job {job_id}"
        super().__init__(self.message)


class StageStatus(StrEnum):
    """A stage row's status: one ``(job, epoch, stage, component)`` attempt series."""

    pending = "pending"
    running = "running"  # held by ``lease_owner`` until ``lease_expires_at`` (heartbeats renew)
    done = "done"
    failed = "failed"  # the last attempt failed; a new claim may retry it


# What may happen to a stage row. Every stage UPDATE of the store takes its allowed source
# statuses from here (``stage_sources``); the lease adds who may make a move (its holder, or
# anyone once it expired), never which moves there are.
STAGE_TRANSITIONS: dict[StageStatus, set[StageStatus]] = {
    # pending -> running: the first claim (a stage with no row yet counts as pending).
    StageStatus.pending: {StageStatus.running},
    # running -> running: the holder renewing its lease (a heartbeat, or claiming it again), or
    # another owner taking over once the lease expired; -> done / failed: the holder finishing.
    StageStatus.running: {StageStatus.running, StageStatus.done, StageStatus.failed},
    # failed -> running: a retry.
    StageStatus.failed: {StageStatus.running},
    # done is final: its record is the stage's result.
    StageStatus.done: set(),
}

# The statuses in which a stage has a lease holder (``lease_owner``, until ``lease_expires_at``).
LEASED: frozenset[StageStatus] = frozenset({StageStatus.running})


def stage_sources(to: StageStatus | str) -> frozenset[StageStatus]:
    """The statuses from which ``STAGE_TRANSITIONS`` lets a stage move to ``to``."""
    to = StageStatus(to)
    return frozenset(src for src, targets in STAGE_TRANSITIONS.items() if to in targets)
