"""A page of a job's traces, read from its stored stage outputs (typed: ``cotune.records``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cotune.records import Stage, stage_order, stage_output_model
from cotune.runtime import Trace
from cotune.spec import SystemSpec
from cotune.store import JobRecord, StageState
from services.api.deps import job_system, page
from services.api.errors import ApiError
from services.api.schemas import ListObject, TraceObject
from services.api.state import ApiState

TRACE_STAGES = (Stage.baseline, Stage.rollout, Stage.evaluate, Stage.test)


@dataclass(frozen=True)
class TraceFilter:
    epoch: int | None = None
    stage: str | None = None
    passed: bool | None = None

    def stage_wanted(self, s: StageState) -> bool:
        return (
            s.stage in TRACE_STAGES
            and not s.component  # the whole job's stage; a component's rows hold no traces
            and s.status == "done"
            and bool(s.output_key)
            and (self.epoch is None or s.epoch == self.epoch)
            and (self.stage is None or s.stage.value == self.stage)
        )


def trace_page(
    state: ApiState, record: JobRecord, wanted: TraceFilter, after: str | None, limit: int
) -> ListObject[TraceObject]:
    """Traces in stage order (epoch, then the loop's order), ``limit`` after the ``after``
    trace id (``epoch:stage:trace``); a cursor whose trace is gone resumes after its stage."""
    system = job_system(record)
    stages = sorted(
        (s for s in state.store.stage_states(record.id) if wanted.stage_wanted(s)),
        key=lambda s: (s.epoch, stage_order(s.stage)),
    )
    after_pos = _trace_cursor(after) if after else None
    data: list[TraceObject] = []
    for s in stages:
        position = (s.epoch, stage_order(s.stage))
        if after_pos is not None and position < after_pos[:2]:
            continue
        if after_pos is not None and position > after_pos[:2]:
            after_pos = None  # the cursor's trace is gone: carry on after its stage
        for trace in _stored_traces(state, s):
            tid = f"{s.epoch}:{s.stage.value}:{trace.trace_id}"
            if after_pos is not None:
                if tid == after:
                    after_pos = None
                continue
            if wanted.passed is not None and trace.passed is not wanted.passed:
                continue
            if len(data) == limit:
                return page(data, limit, has_more=True)
            shown = trace.model_dump(mode="json")
            data.append(_trace_object(record.id, system, s.epoch, s.stage.value, tid, shown))
    return page(data, limit, has_more=False)


def _stored_traces(state: ApiState, s: StageState) -> list[Trace]:
    try:
        stored = state.artifacts.get_json(str(s.output_key))
    except FileNotFoundError:
        return []
    return list(stage_output_model(s.stage).model_validate(stored).shown_traces())


def _trace_cursor(after: str) -> tuple[int, int, str]:
    epoch, _, rest = after.partition(":")
    stage, _, trace_id = rest.partition(":")
    try:
        return int(epoch), stage_order(Stage(stage)), trace_id
    except (ValueError, KeyError):
        raise ApiError(
            422, "invalid_request", f"after: {after!r} is not a trace id", "after"
        ) from None


def _trace_object(
    job_id: str, system: SystemSpec, epoch: int, stage: str, tid: str, trace: dict[str, Any]
) -> TraceObject:
    """A stored trace with server paths taken out of its spans: the model becomes its registry
    name and an adapter its artifact key within the job."""
    spans = []
    for span in trace.get("spans") or []:
        span = dict(span)
        try:
            component = system.component(str(span.get("component")))
        except KeyError:
            component = None
        if span.get("model") is not None:
            ref = system.models.get(component.model or "") if component is not None else None
            span["model"] = ref.name if ref is not None and ref.name else None
        adapter = span.get("adapter")
        if isinstance(adapter, str):
            marker = f"{job_id}/"
            span["adapter"] = (
                adapter[adapter.index(marker) + len(marker) :] if marker in adapter else None
            )
        spans.append(span)
    fields = {k: v for k, v in trace.items() if k != "spans"}
    return TraceObject(id=tid, epoch=epoch, stage=stage, spans=spans, **fields)
