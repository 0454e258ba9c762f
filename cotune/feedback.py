"""Human feedback as data: rows of system runs a person rated, read as *fixed traces*.

A ``feedback`` file is JSONL, one row per rated run (the format an exporter writes; a line of
``cotune eval --out``'s ``traces.jsonl`` plus a ``feedback`` field is a valid row, its other
Trace fields ignored)::

    {"id": "r1",                                   # optional, unique
     "inputs": {"question": "..."},                # the system's input fields (all required)
     "output": "...",                              # the final output as rated
     "feedback": {"rating": 0.0-1.0 | "up" | "down",   # up = 1.0, down = 0.0
                  "comment": "...",                # optional: the person's words
                  "corrected_output": "..."},      # optional: what it should have said
     "spans": [...]}                               # optional: the whole trace's Span objects

``parse_feedback`` checks ``(line, row)`` pairs (``cotune.data``'s readers) and raises
``DataError(path, line, field)`` naming the field (``feedback.rating``, ``inputs.question``,
``spans[2].output``). Without a system (an upload, checked before any job names it) it checks
what a row can be checked against alone; with one, also the input fields, the spans against
the components, and that under a gold metric every row has a ``corrected_output`` (its gold,
what replays are scored against; rows that carry only a rating need ``metric: judge``).

In the loop (``cotune.loop``) a row is a fixed trace (``fixed_traces``): its output is the
rated one, never re-generated; its score is the rating. With ``spans`` the trace's spans are
the row's; without, the system is run once on the row's inputs to reconstruct the upstream
spans (``Span.reconstructed``) and the final writer's span is pinned to the rated output. An
LLM span's messages are rendered again from the job's prompts and the trace's own fields, so
a training prompt holds only what the component reads, never text a row put there.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cotune.data import JSONL_SUFFIXES, Example, Row, iter_rows
from cotune.errors import DataError
from cotune.metrics import JUDGE
from cotune.runtime import Feedback, Span, Trace

if TYPE_CHECKING:
    from cotune.runtime import Runtime
    from cotune.spec import SystemSpec

RATINGS = {"up": 1.0, "down": 0.0}
COMMENT_MAX = 10_000
CORRECTED_OUTPUT_MAX = 100_000


class GivenFeedback(BaseModel):
    """What a person said about one output, as given: a feedback row's ``feedback`` and the
    served system's feedback body (``cotune.serving``), so both check it alike. The rating is
    kept as written ('up' stays 'up' in an export); ``normalized`` is what a trace holds."""

    model_config = ConfigDict(extra="forbid")

    rating: float | Literal["up", "down"] = Field(
        description="0.0 (bad) to 1.0 (good), or 'up' / 'down'"
    )
    comment: str | None = Field(
        default=None,
        max_length=COMMENT_MAX,
        description="the person's words: what was wrong or right (the judge reads it)",
    )
    corrected_output: str | None = Field(
        default=None,
        max_length=CORRECTED_OUTPUT_MAX,
        description="what the system should have answered (a retraining job takes it as gold)",
    )

    @field_validator("rating", mode="before")
    @classmethod
    def _rating(cls, value: Any) -> Any:
        if isinstance(value, str) and value in RATINGS:
            return value
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and math.isfinite(value) and 0.0 <= value <= 1.0:
            return float(value)
        raise ValueError(f"must be a number from 0 to 1, 'up' or 'down', got {value!r}")

    @field_validator("comment", "corrected_output")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty or blank (leave it out instead)")
        return value

    def normalized(self) -> Feedback:
        rating = RATINGS[self.rating] if isinstance(self.rating, str) else self.rating
        return Feedback(rating=rating, comment=self.comment, corrected_output=self.corrected_output)

    def as_json(self) -> dict[str, Any]:
        """As the feedback file holds it: the optional parts only where given."""
        return self.model_dump(mode="json", exclude_none=True)


class FeedbackRow(BaseModel):
    """One checked row: a rated run of the system."""

    id: str
    line: int = Field(description="the row's line in its file")
    inputs: dict[str, Any]
    output: Any
    feedback: Feedback
    spans: list[Span] | None = None

    @property
    def expected(self) -> list[str] | None:
        """The row's gold: its ``corrected_output``, where it has one."""
        corrected = self.feedback.corrected_output
        return [corrected] if corrected is not None else None

    def example(self) -> Example:
        """The row's inputs (and gold) as an example the system can be run on."""
        return Example(id=self.id, inputs=dict(self.inputs), expected=self.expected)


# -- parsing ----------------------------------------------------------------------------------


def load_feedback(path: str | Path, system: SystemSpec) -> list[FeedbackRow]:
    """A job's ``data.feedback`` file, checked against its system."""
    path = Path(path)
    if path.suffix.lower() not in JSONL_SUFFIXES:
        raise DataError("a feedback file is JSONL (.jsonl), one rated run per line", path=str(path))
    return parse_feedback(iter_rows(path), system, source=str(path))


def parse_feedback(
    rows: Iterable[Row], system: SystemSpec | None = None, source: str = "<feedback>"
) -> list[FeedbackRow]:
    """Check rows of a feedback file; ``system`` None checks what needs no system."""
    checked: list[FeedbackRow] = []
    seen: dict[str, int] = {}
    for line_no, row in rows:

        def fail(message: str, field: str, line: int = line_no) -> DataError:
            return DataError(message, path=source, line=line, field=field)

        row_id = _row_id(row.get("id"), line_no, fail)
        if row_id in seen:
            raise fail(f"id {row_id!r} is also used on line {seen[row_id]}", "id")
        seen[row_id] = line_no
        inputs = _inputs(row.get("inputs"), system, fail)
        if row.get("output") is None:
            raise fail(
                "missing field 'output': the system's final output as it was rated", "output"
            )
        feedback = _feedback(row.get("feedback"), fail)
        if system is not None and system.metric != JUDGE and feedback.corrected_output is None:
            raise fail(
                f"missing 'feedback.corrected_output': metric {system.metric!r} scores a rated "
                "run's replays against it (it is the row's gold); rows that carry only a rating "
                "need system.metric judge",
                "feedback.corrected_output",
            )
        spans = _spans(row.get("spans"), fail)
        if spans is not None and system is not None:
            _check_spans(spans, row["output"], system, fail)
        checked.append(
            FeedbackRow(
                id=row_id,
                line=line_no,
                inputs=inputs,
                output=row["output"],
                feedback=feedback,
                spans=spans,
            )
        )
    if not checked:
        raise DataError("no rows", path=source)
    return checked


def _row_id(raw: Any, line_no: int, fail: Any) -> str:
    if raw is None:
        return f"feedback-{line_no}"
    if isinstance(raw, str | int) and not isinstance(raw, bool) and str(raw):
        return str(raw)
    raise fail(f"field 'id' must be a non-empty string, got {raw!r}", "id")


def _inputs(raw: Any, system: SystemSpec | None, fail: Any) -> dict[str, Any]:
    if not isinstance(raw, dict) or not raw:
        raise fail(
            f"field 'inputs' must be an object holding the system's input fields, got {raw!r}",
            "inputs",
        )
    if system is None:
        return dict(raw)
    inputs: dict[str, Any] = {}
    for name in system.inputs:
        if raw.get(name) is None:
            raise fail(
                f"missing input field {name!r} (the system's inputs: {system.inputs})",
                f"inputs.{name}",
            )
        inputs[name] = raw[name]
    return inputs


def _feedback(raw: Any, fail: Any) -> Feedback:
    if not isinstance(raw, dict):
        raise fail(
            "field 'feedback' must be an object {rating, comment?, corrected_output?}, got "
            f"{raw!r}",
            "feedback",
        )
    try:
        return GivenFeedback.model_validate(raw).normalized()
    except ValidationError as err:
        first = err.errors()[0]
        where = "feedback." + ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise fail(f"{where!r}: {message}", where) from None


def _spans(raw: Any, fail: Any) -> list[Span] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw:
        raise fail("field 'spans' must be a non-empty list of the trace's spans", "spans")
    spans = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise fail(f"'spans[{i}]' must be a span object", f"spans[{i}]")
        try:
            spans.append(Span.model_validate(item))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise fail(f"'spans[{i}].{where}': {first['msg']}", f"spans[{i}].{where}") from None
    return spans


def _check_spans(spans: list[Span], output: Any, system: SystemSpec, fail: Any) -> None:
    """Every component once, as the system declares it; the output's writer wrote ``output``."""
    from cotune.synthesis import as_completion

    names = [c.name for c in system.components]
    seen: set[str] = set()
    for i, span in enumerate(spans):
        if span.component not in names:
            raise fail(
                f"'spans[{i}].component': {span.component!r} is not a component of the system "
                f"({names})",
                f"spans[{i}].component",
            )
        if span.component in seen:
            raise fail(f"component {span.component!r} has two spans", f"spans[{i}].component")
        seen.add(span.component)
        component = system.component(span.component)
        for field, want, got in (
            ("span_id", component.name, span.span_id),
            ("kind", component.kind, span.kind),
            ("writes", component.writes, span.writes),
        ):
            if got != want:
                raise fail(
                    f"'spans[{i}].{field}' is {got!r}; the system's {component.name!r} has "
                    f"{want!r}",
                    f"spans[{i}].{field}",
                )
        if span.writes == system.output and as_completion(span.output) != as_completion(output):
            raise fail(
                f"'spans[{i}].output' differs from the row's rated 'output' (the span "
                f"writes the system's output {system.output!r})",
                f"spans[{i}].output",
            )
    missing = [n for n in names if n not in seen]
    if missing:
        raise fail(f"'spans' lacks the spans of components {missing}", "spans")


# -- fixed traces -----------------------------------------------------------------------------


def fixed_traces(
    rows: Sequence[FeedbackRow], system: SystemSpec, runtime: Runtime | None
) -> list[Trace]:
    """The rows as fixed traces, in order. Rows without spans are run once (batched) through
    ``runtime`` to reconstruct their spans; the span writing the output is pinned to the
    rated output. ``runtime`` may be None when every row has its spans."""
    bare = [row for row in rows if row.spans is None]
    rerun: dict[str, Trace] = {}
    if bare:
        if runtime is None:
            raise ValueError("feedback rows without spans need a runtime to reconstruct them")
        for row, trace in zip(bare, runtime.run([r.example() for r in bare]), strict=True):
            rerun[row.id] = trace
    return [_fixed(row, system, rerun.get(row.id)) for row in rows]


def _fixed(row: FeedbackRow, system: SystemSpec, rerun: Trace | None) -> Trace:
    from cotune.prompts import render_messages

    if rerun is not None:
        spans = []
        for span in rerun.spans:
            copied = span.model_copy(deep=True)
            if span.writes == system.output:
                copied.output, copied.replaced, copied.error = row.output, True, None
            else:
                copied.reconstructed = True
            spans.append(copied)
    else:
        assert row.spans is not None
        order = {c.name: i for i, c in enumerate(system.components)}
        spans = sorted(
            (s.model_copy(deep=True) for s in row.spans), key=lambda s: order[s.component]
        )
    trace = Trace(
        trace_id=uuid.uuid4().hex[:16],
        example_id=row.id,
        inputs=dict(row.inputs),
        expected=row.expected,
        spans=spans,
        output=row.output,
        score=row.feedback.rating,
        passed=row.feedback.rating >= system.pass_threshold,
        feedback=row.feedback,
    )
    values = trace.fields()
    for span in trace.spans:
        component = system.component(span.component)
        span.inputs = {name: values[name] for name in component.reads}
        if component.kind == "llm":
            span.messages = render_messages(component, values)
    return trace
