"""Checking an uploaded file from its bytes, before it is stored."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

from cotune.data import iter_csv, iter_jsonl, parse_corpus
from cotune.errors import DataError
from cotune.jobs.materialize import is_csv
from services.api.policy import json_problem


def _checked_rows(rows: Iterator[tuple[int, Any]], source: str) -> Iterator[tuple[int, Any]]:
    for line_no, row in rows:
        problem = json_problem(row)
        if problem is not None:
            raise DataError(problem[1], path=source, line=line_no, field=problem[0] or None)
        yield line_no, row


# -- uploads ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadSummary:
    """What an upload holds: its row count and, per field, how many rows have a value."""

    rows: int
    fields: dict[str, int]


class _Lines:
    """The lines of a binary stream, refusing one longer than ``limit`` bytes (naming it)."""

    def __init__(self, stream: IO[bytes], limit: int, source: str) -> None:
        self.stream, self.limit, self.source = stream, limit, source

    def __iter__(self) -> Iterator[bytes]:
        line_no = 0
        while True:
            line = self.stream.readline(self.limit + 1)
            if not line:
                return
            line_no += 1
            if len(line) > self.limit and not line.endswith(b"\n"):
                raise DataError(
                    f"line is longer than {self.limit} bytes", path=self.source, line=line_no
                )
            yield line


def check_upload(
    stream: IO[bytes], purpose: str, filename: str, *, max_line_bytes: int = 1 << 20
) -> UploadSummary:
    """Check an uploaded file from its bytes: UTF-8, one JSON object per line (or CSV for
    data), line size, field types, unique ids. Raises ``DataError`` naming line and field.

    ``data``: ``expected`` is a string or a non-empty list of strings, ``id`` a non-empty
    string or integer, unique. Which input fields a job needs is checked at ``POST /v1/jobs``
    against ``fields``. ``corpus``: ``{id, text, title?}`` rows (``cotune.data.parse_corpus``).
    ``feedback``: rated runs, JSONL only (``cotune.feedback.parse_feedback`` without a system);
    ``fields`` counts them by dotted name (``inputs.question``, ``feedback.corrected_output``).
    """
    source = filename
    lines = cast(IO[bytes], _Lines(stream, max_line_bytes, source))
    if purpose == "corpus":
        if is_csv(filename):
            raise DataError("a corpus must be JSONL rows of {id, text, title?}", path=source)
        passages = parse_corpus(_checked_rows(iter_jsonl(lines, source), source), source=source)
        fields: dict[str, int] = {"id": len(passages), "text": len(passages)}
        titled = sum(1 for p in passages if "title" in p)
        if titled:
            fields["title"] = titled
        return UploadSummary(rows=len(passages), fields=fields)
    if purpose == "fine-tune":
        return _check_openai_rows(lines, filename, source)
    if purpose == "feedback":
        return _check_feedback_rows(lines, filename, source)
    if purpose != "data":
        raise DataError(
            f"purpose must be 'data', 'fine-tune', 'feedback' or 'corpus', got {purpose!r}",
            path=source,
        )
    if is_csv(filename):
        # The CSV reader takes the whole stream; still refuse an over-long physical line.
        content = b"".join(_Lines(stream, max_line_bytes, source))
        import io

        rows = iter_csv(io.BytesIO(content), source)
    else:
        rows = iter_jsonl(lines, source)
    counts: dict[str, int] = {}
    seen: dict[str, int] = {}
    n = 0
    for line_no, row in _checked_rows(rows, source):
        n += 1
        expected = row.get("expected")
        if expected is not None and not (
            isinstance(expected, str)
            or (
                isinstance(expected, list)
                and expected
                and all(isinstance(item, str) for item in expected)
            )
        ):
            raise DataError(
                "field 'expected' must be a string or a non-empty list of strings, got "
                f'{expected!r} (quote numbers: "417")',
                path=source,
                line=line_no,
                field="expected",
            )
        raw_id = row.get("id")
        if raw_id is not None:
            if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or not str(raw_id):
                raise DataError(
                    f"field 'id' must be a non-empty string, got {raw_id!r}",
                    path=source,
                    line=line_no,
                    field="id",
                )
            if str(raw_id) in seen:
                raise DataError(
                    f"id {str(raw_id)!r} is also used on line {seen[str(raw_id)]}",
                    path=source,
                    line=line_no,
                    field="id",
                )
            seen[str(raw_id)] = line_no
        for name, value in row.items():
            if not isinstance(name, str) or not name or len(name) > 255:
                raise DataError(
                    f"field name {name!r} is empty or too long", path=source, line=line_no
                )
            if value is not None:
                counts[name] = counts.get(name, 0) + 1
    if n == 0:
        raise DataError("no rows", path=source)
    return UploadSummary(rows=n, fields=counts)


def _check_openai_rows(lines: IO[bytes], filename: str, source: str) -> UploadSummary:
    """OpenAI's fine-tuning JSONL (``cotune.openai_jobs``): all chat rows or all preference
    rows; ``fields`` counts the rows of the kind (``messages`` or ``preferred_output``)."""
    from cotune.openai_jobs import KIND_FIELD, read_openai_rows

    if is_csv(filename):
        raise DataError("fine-tune data is JSONL: {messages} or preference rows", path=source)
    found = read_openai_rows(_checked_rows(iter_jsonl(lines, source), source), source)
    return UploadSummary(rows=found.rows, fields={KIND_FIELD[found.kind]: found.rows})


def _check_feedback_rows(lines: IO[bytes], filename: str, source: str) -> UploadSummary:
    """Rated runs (``cotune.feedback``), checked without a system: which input fields a job
    needs, and ``corrected_output`` where its metric is not ``judge``, are checked at
    ``POST /v1/jobs`` against ``fields``; the spans against the system when the job runs."""
    from cotune.feedback import parse_feedback

    if is_csv(filename):
        raise DataError(
            "a feedback file is JSONL: {inputs, output, feedback, spans?} rows", path=source
        )
    rows = parse_feedback(_checked_rows(iter_jsonl(lines, source), source), source=source)
    counts: dict[str, int] = {"output": len(rows), "feedback.rating": len(rows)}

    def count(name: str) -> None:
        counts[name] = counts.get(name, 0) + 1

    for row in rows:
        for name, value in row.inputs.items():
            if not isinstance(name, str) or not name or len(name) > 255:
                raise DataError(
                    f"field name {name!r} is empty or too long",
                    path=source,
                    line=row.line,
                    field="inputs",
                )
            if value is not None:
                count(f"inputs.{name}")
        for name in ("comment", "corrected_output"):
            if getattr(row.feedback, name) is not None:
                count(f"feedback.{name}")
        if row.spans is not None:
            count("spans")
    return UploadSummary(rows=len(rows), fields=counts)
