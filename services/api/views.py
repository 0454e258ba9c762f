"""Store records -> response objects (``schemas``), with server paths redacted."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import ValidationError

from cotune.records import ComponentEpochRecord, EpochRecord, JobReport
from cotune.spec import SystemSpec
from cotune.spec.job import LoopConfig, TrainConfig
from cotune.store import JobRecord, JobStatus, StoredEvent
from cotune.store.accounts import FileRecord
from cotune.store.status import TERMINAL
from services.api.schemas import (
    CheckpointMetrics,
    CheckpointObject,
    ComponentObject,
    EventObject,
    FileObject,
    Hyperparameters,
    JobError,
    JobMethod,
    JobObject,
    JobResultSummary,
)
from services.api.state import ApiState

_LEVELS = {"info": "info", "warning": "warn", "warn": "warn", "error": "error"}


def ts(value: datetime | float | None) -> int | None:
    if value is None:
        return None
    return int(value.timestamp()) if isinstance(value, datetime) else int(value)


def file_object(record: FileRecord) -> FileObject:
    return FileObject(
        id=record.id,
        bytes=record.bytes,
        created_at=ts(record.created_at) or 0,
        filename=record.filename,
        purpose=record.purpose,
        sha256=record.sha256,
        rows=record.rows,
        fields=record.fields,
    )


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _section(model: type[LoopConfig] | type[TrainConfig], value: Any) -> Any:
    try:
        return model.model_validate(value if isinstance(value, dict) else {})
    except ValidationError:
        return model()


def report_of(record: JobRecord) -> JobReport | None:
    if not record.result:
        return None
    try:
        return JobReport.model_validate(record.result)
    except ValidationError:
        return None


def job_object(record: JobRecord, state: ApiState, *, with_spec: bool = True) -> JobObject:
    """The job as the API shows it; ``with_spec=False`` (lists) leaves the spec out."""
    spec = record.spec
    data: dict[str, Any] = _mapping(spec.get("data"))
    system = _mapping(spec.get("system"))
    models = _mapping(system.get("models"))
    names = sorted(
        {
            str(ref.get("name"))
            for ref in models.values()
            if isinstance(ref, dict) and ref.get("name")
        }
    )
    loop = _section(LoopConfig, spec.get("loop"))
    train = _section(TrainConfig, spec.get("train"))
    report = report_of(record)
    error = None
    if record.status == JobStatus.failed:
        error = JobError(code="job_failed", message=state.redact(record.error) or "failed")
    summary = None
    trained_tokens = None
    if report is not None:
        summary = JobResultSummary(
            base_val_score=report.base_val_score,
            best_epoch=report.best_epoch,
            best_val_score=report.best_val_score,
            base_test_score=report.base_test_score,
            test_score=report.test_score,
            stop_reason=report.stop_reason,
            adapters=sorted(report.adapters),
        )
        trained_tokens = sum(s.trained_tokens for s in report.stages)
    method = None
    if train.rows == "given":
        hyper: dict[str, Any] = {"n_epochs": train.epochs, "batch_size": train.batch_size}
        if train.method == "sft+dpo":
            method = JobMethod(
                type="dpo", dpo={"hyperparameters": {**hyper, "beta": train.dpo_beta}}
            )
        else:
            method = JobMethod(type="supervised", supervised={"hyperparameters": hyper})
    fine_tuned = None
    if record.status == JobStatus.succeeded and report is not None and report.best_epoch:
        fine_tuned = f"{record.name}:{record.id}"
    return JobObject(
        id=record.id,
        created_at=ts(record.created_at) or 0,
        finished_at=ts(record.updated_at) if record.status in TERMINAL else None,
        status=record.status.value,
        model=",".join(names) or record.name,
        fine_tuned_model=fine_tuned,
        organization_id=record.tenant_id or "",
        hyperparameters=Hyperparameters(
            # given rows (OpenAI-style jobs) are one loop epoch of train.epochs passes
            n_epochs=train.epochs if train.rows == "given" else loop.epochs,
            batch_size=train.batch_size,
            learning_rate=train.learning_rate,
            method=train.method,
            lora_r=train.lora_r,
            lora_alpha=train.lora_alpha,
            train_epochs=train.epochs,
        ),
        training_file=str(data.get("train") or ""),
        validation_file=data.get("val"),
        test_file=data.get("test"),
        trained_tokens=trained_tokens,
        seed=loop.seed,
        error=error,
        method=method,
        name=record.name,
        cancel_requested=record.cancel_requested,
        spec=spec if with_spec else None,
        result=summary,
    )


def event_id(event: StoredEvent) -> str:
    return f"ftevent-{event.id}"


MAX_EVENT_ID = 2**63 - 1  # events.id is a bigint


def parse_event_cursor(after: str | None, param: str = "after") -> int | None:
    """``ftevent-<n>`` -> n. Empty means none (an EventSource sends an empty Last-Event-ID
    before its first event); anything else that is not an id cotune issued answers 422."""
    if not after:
        return None
    raw = after.removeprefix("ftevent-")
    # ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_EVENT_ID:
        from services.api.errors import ApiError

        raise ApiError(422, "invalid_request", f"{param}: {after!r} is not an event id", param)
    return int(raw)


def event_object(event: StoredEvent, state: ApiState) -> EventObject:
    return EventObject(
        id=event_id(event),
        created_at=ts(event.created_at) or 0,
        level=_LEVELS.get(event.level, "info"),
        message=state.redact(event.message) or "",
        data=event.data or None,
    )


def checkpoint_id(job_id: str, epoch: int) -> str:
    return f"ftckpt-{job_id.removeprefix('job-')}-{epoch}"


def checkpoint_object(
    record: JobRecord, epoch: EpochRecord, created: datetime | None
) -> CheckpointObject:
    last_losses = [c.sft_losses[-1] for c in epoch.components if c.sft_losses]
    return CheckpointObject(
        id=checkpoint_id(record.id, epoch.epoch),
        created_at=ts(created or record.updated_at) or 0,
        fine_tuned_model_checkpoint=f"{record.name}:{record.id}:epoch-{epoch.epoch}",
        fine_tuning_job_id=record.id,
        metrics=CheckpointMetrics(
            step=float(epoch.epoch),
            train_loss=sum(last_losses) / len(last_losses) if last_losses else None,
            train_score=epoch.train_score,
            val_score=epoch.val_score,
        ),
        step_number=epoch.epoch,
        epoch=epoch,
    )


def component_objects(system: SystemSpec, epochs: list[EpochRecord]) -> list[ComponentObject]:
    """The system's components, each with what every epoch did to it."""
    per: dict[str, list[ComponentEpochRecord]] = {}
    for epoch in epochs:
        for c in epoch.components:
            per.setdefault(c.component, []).append(c)
    data = []
    for component in system.components:
        ref = system.models.get(component.model or "")
        data.append(
            ComponentObject(
                id=component.name,
                name=component.name,
                kind=component.kind,
                model=ref.name if ref is not None else None,
                tool=component.tool,
                trainable=component.is_trainable,
                reads=component.reads,
                writes=component.writes,
                epochs=per.get(component.name, []),
            )
        )
    return data
