"""Judge replies as checked verdicts (``parse_verdict``): what is refused, what is fixed quietly.

- refused (``JudgeParseError``): no JSON object in the text, a schema mismatch (pydantic), an
  unknown ``span_id`` or ``decisive_span_id``, a ``component`` that is not the span's.
- fixed: a ```` ```json ```` fence or prose around the object is ignored (the first decodable
  ``{...}`` block is taken); ``should_have_output`` on a tool span is dropped (set to ``None``:
  a tool's output is not something a model can be trained to write, but blaming the tool is
  still information); an empty ``should_have_output`` becomes ``None``; a span critiqued twice
  keeps its first critique; unknown extra keys are ignored.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from cotune.judge.schema import ComponentCritique, JudgeVerdict
from cotune.runtime import Trace
from cotune.spec import SystemSpec


class JudgeParseError(ValueError):
    """A judge reply that cannot be used; ``reason`` says why (it goes into the repair prompt)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def extract_json(text: str) -> dict[str, Any]:
    """The JSON object in a reply: the whole text, a fenced block, or the first {...} in it."""
    stripped = text.strip()
    if not stripped:
        raise JudgeParseError("invalid JSON: the reply is empty")
    candidates = [stripped, *(m.group(1).strip() for m in _FENCE.finditer(text))]
    for candidate in candidates:
        try:
            loaded = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(loaded, dict):
            return loaded
    decoder = json.JSONDecoder()
    first_error: json.JSONDecodeError | None = None
    for match in re.finditer(r"\{", text):
        try:
            loaded, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError as err:
            first_error = first_error or err
            continue
        if isinstance(loaded, dict):
            return loaded
    if first_error is not None:
        raise JudgeParseError(f"invalid JSON: {first_error.msg} (char {first_error.pos})")
    raise JudgeParseError("invalid JSON: the reply holds no JSON object")


def pydantic_reason(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"schema mismatch: field {where!r}: {first['msg']}{more}"


def parse_verdict(text: str, system: SystemSpec, trace: Trace) -> JudgeVerdict:
    """A judge reply as a checked verdict; ``JudgeParseError`` says why one cannot be used."""
    data = extract_json(text)
    try:
        verdict = JudgeVerdict.model_validate(data)
    except ValidationError as err:
        raise JudgeParseError(pydantic_reason(err)) from None
    spans = {s.span_id: s for s in trace.spans}
    known = ", ".join(spans)
    if verdict.decisive_span_id is not None and verdict.decisive_span_id not in spans:
        raise JudgeParseError(
            f"unknown decisive_span_id {verdict.decisive_span_id!r}; span ids: {known}"
        )
    kept: list[ComponentCritique] = []
    seen: set[str] = set()
    for item in verdict.components:
        span = spans.get(item.span_id)
        if span is None:
            raise JudgeParseError(f"unknown span_id {item.span_id!r}; span ids: {known}")
        if item.component != span.component:
            raise JudgeParseError(
                f"span {item.span_id!r} belongs to component {span.component!r}, "
                f"not {item.component!r}"
            )
        if item.span_id in seen:
            continue  # a span critiqued twice keeps its first critique
        seen.add(item.span_id)
        proposed = item.should_have_output
        if proposed is not None and (span.kind != "llm" or not proposed.strip()):
            item = item.model_copy(update={"should_have_output": None})
        kept.append(item)
    return verdict.model_copy(update={"components": kept})
