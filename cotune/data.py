"""Examples and corpora: loaded from JSONL or CSV, refused with errors naming file, line, field.

Rows come from a reader (``iter_jsonl`` / ``iter_csv`` over a binary stream, so the API can
check an upload from memory) as ``(line, row)`` pairs; ``parse_examples`` and ``parse_corpus``
check them against the system.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pydantic import BaseModel

from cotune.errors import DataError
from cotune.metrics import metric_needs_gold

if TYPE_CHECKING:
    from cotune.spec import SystemSpec

Row = tuple[int, dict[str, Any]]  # (1-based line number, row)

JSONL_SUFFIXES = {".jsonl", ".ndjson"}
CSV_SUFFIXES = {".csv"}


class Example(BaseModel):
    id: str
    inputs: dict[str, Any]
    expected: list[str] | None = None
    rejected: str | None = None  # a dispreferred output (OpenAI's preference rows)
    # The ideal value of fields the system's components write, by field (a row's ``targets``):
    # read only by ``train.rows: targets`` (teacher-forced SFT rows: an oracle), never by the loop
    targets: dict[str, Any] | None = None


# -- readers ----------------------------------------------------------------------------------


def iter_jsonl(stream: IO[bytes], source: str) -> Iterator[Row]:
    """One JSON object per line; blank lines are skipped."""
    for line_no, raw in enumerate(stream, start=1):
        try:
            text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"not valid UTF-8 ({err.reason})", path=source, line=line_no) from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"not valid JSON: {err.msg} (column {err.colno})", path=source, line=line_no
            ) from None
        except RecursionError:  # the decoder recurses per level: 100,000 "[" exhaust it
            raise DataError(
                "not valid JSON: nested too deeply", path=source, line=line_no
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"expected a JSON object, got {type(row).__name__}", path=source, line=line_no
            )
        yield line_no, row


def iter_csv(stream: IO[bytes], source: str) -> Iterator[Row]:
    """A header row, then one row per record; empty cells count as missing."""
    content = stream.read()
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_no = content[: err.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 ({err.reason})", path=source, line=line_no) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    try:
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue
            if header is None:
                header = [cell.strip() for cell in cells]
                _check_header(header, source, reader.line_num)
                continue
            if len(cells) > len(header):
                raise DataError(
                    f"{len(cells)} cells but the header has {len(header)} columns",
                    path=source,
                    line=reader.line_num,
                )
            yield reader.line_num, {k: v for k, v in zip(header, cells, strict=False) if v != ""}
    except csv.Error as err:
        raise DataError(f"not valid CSV: {err}", path=source, line=reader.line_num) from None


def _check_header(header: list[str], source: str, line_no: int) -> None:
    for column in header:
        if not column:
            raise DataError("the header has an empty column name", path=source, line=line_no)
        if header.count(column) > 1:
            raise DataError(
                f"the header names column {column!r} twice", path=source, line=line_no, field=column
            )


def iter_rows(path: str | Path) -> Iterator[Row]:
    """The rows of a JSONL or CSV file, chosen by suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in JSONL_SUFFIXES | CSV_SUFFIXES:
        raise DataError(
            f"unsupported file type {suffix or '(none)'!r}; use .jsonl or .csv", path=str(path)
        )
    try:
        stream = path.open("rb")
    except OSError as err:
        raise DataError(f"cannot open: {err.strerror}", path=str(path)) from None
    with stream:
        reader = iter_csv if suffix in CSV_SUFFIXES else iter_jsonl
        yield from reader(stream, str(path))


# -- examples ---------------------------------------------------------------------------------


def load_examples(path: str | Path, system: SystemSpec, split: str = "train") -> list[Example]:
    """A split's examples of rows (a job's ``data.format: openai`` splits are read by
    ``cotune.openai_jobs.load_split``)."""
    return parse_examples(iter_rows(path), system, split=split, source=str(path))


def parse_examples(
    rows: Iterable[Row], system: SystemSpec, split: str = "train", source: str = "<data>"
) -> list[Example]:
    """Check rows against the system: each input field present, ``expected`` well-formed (and
    present when the metric needs it), ids unique."""
    needs_gold = metric_needs_gold(system.metric)
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for line_no, row in rows:

        def fail(message: str, field: str, line: int = line_no) -> DataError:
            return DataError(message, path=source, line=line, field=field)

        inputs: dict[str, Any] = {}
        for name in system.inputs:
            if row.get(name) is None:
                raise fail(
                    f"missing input field {name!r} (the system's inputs: {system.inputs})", name
                )
            inputs[name] = row[name]

        expected = row.get("expected")
        if isinstance(expected, str):
            expected = [expected]
        if expected is None:
            if needs_gold:
                raise fail(
                    f"missing field 'expected': metric {system.metric!r} compares the "
                    "output against it",
                    "expected",
                )
        elif (
            not isinstance(expected, list)
            or not expected
            or not all(isinstance(item, str) for item in expected)
        ):
            raise fail(
                "field 'expected' must be a string or a non-empty list of strings, got "
                f'{row["expected"]!r} (quote numbers: "417")',
                "expected",
            )

        raw_id = row.get("id")
        if raw_id is None:
            example_id = f"{split}-{line_no}"
        elif isinstance(raw_id, str | int) and not isinstance(raw_id, bool) and str(raw_id):
            example_id = str(raw_id)
        else:
            raise fail(f"field 'id' must be a non-empty string, got {raw_id!r}", "id")
        if example_id in seen:
            raise fail(f"id {example_id!r} is also used on line {seen[example_id]}", "id")
        seen[example_id] = line_no
        targets = row.get("targets")
        if targets is not None:
            written = {c.writes for c in system.components}
            if not isinstance(targets, dict) or not set(targets) <= written:
                raise fail(
                    "field 'targets' must map fields the system's components write "
                    f"({sorted(written)}) to their ideal values, got {targets!r}",
                    "targets",
                )
        examples.append(Example(id=example_id, inputs=inputs, expected=expected, targets=targets))
    if not examples:
        raise DataError("no rows", path=source)
    return examples


# -- corpora ----------------------------------------------------------------------------------


def load_corpus(path: str | Path) -> list[dict[str, str]]:
    """A JSONL corpus of ``{id, text, title?}`` rows."""
    path = Path(path)
    if path.suffix.lower() not in JSONL_SUFFIXES:
        raise DataError("a corpus must be a .jsonl file of {id, text, title?} rows", path=str(path))
    return parse_corpus(iter_rows(path), source=str(path))


def parse_corpus(rows: Iterable[Row], source: str = "<corpus>") -> list[dict[str, str]]:
    passages: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    for line_no, row in rows:
        for name in ("id", "text"):
            if not isinstance(row.get(name), str):
                what = "missing" if row.get(name) is None else f"not a string: {row[name]!r}"
                raise DataError(f"field {name!r} is {what}", path=source, line=line_no, field=name)
        title = row.get("title")
        if title is not None and not isinstance(title, str):
            raise DataError(
                f"field 'title' is not a string: {title!r}",
                path=source,
                line=line_no,
                field="title",
            )
        if row["id"] in seen:
            raise DataError(
                f"id {row['id']!r} is also used on line {seen[row['id']]}",
                path=source,
                line=line_no,
                field="id",
            )
        seen[row["id"]] = line_no
        passage = {"id": row["id"], "text": row["text"]}
        if title:
            passage["title"] = title
        passages.append(passage)
    if not passages:
        raise DataError("no rows", path=source)
    return passages
