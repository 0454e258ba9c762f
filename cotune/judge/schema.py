"""The judge's verdict: its pydantic models and the JSON schema replies are decoded under."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cotune.runtime import Trace
from cotune.spec import SystemSpec

ErrorType = Literal[
    "wrong_content", "bad_format", "missing_info", "hallucination", "irrelevant", "none"
]
ERROR_TYPES: tuple[str, ...] = (
    "wrong_content",
    "bad_format",
    "missing_info",
    "hallucination",
    "irrelevant",
    "none",
)
MAX_TEXT = 300  # maxLength of the schema's free-text fields
MAX_OUTPUT_TEXT = 2000  # the most a proposed output may be (schema), for long-output components
# a critique's fields in the order the schema asks a model to write them
CRITIQUE_FIELDS = (
    "span_id",
    "component",
    "error_type",
    "critique",
    "should_have_output",
    "blame",
    "confidence",
)


class ComponentCritique(BaseModel):
    model_config = ConfigDict(extra="ignore")

    span_id: str
    component: str
    blame: float = Field(ge=0.0, le=1.0)
    error_type: ErrorType
    critique: str
    should_have_output: str | None = None
    confidence: float = Field(ge=0.0, le=1.0)


class JudgeVerdict(BaseModel):
    model_config = ConfigDict(extra="ignore")

    system_correct: bool
    failure_summary: str
    decisive_span_id: str | None = None
    components: list[ComponentCritique]

    def critique(self, span_id: str) -> ComponentCritique | None:
        return next((c for c in self.components if c.span_id == span_id), None)


def _unique(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _output_chars(system: SystemSpec, trace: Trace) -> int:
    """maxLength of ``should_have_output``: room for the longest LLM span's output."""
    limit = MAX_TEXT
    for span in trace.spans:
        if span.kind != "llm":
            continue
        try:
            max_tokens = system.component(span.component).max_tokens
        except KeyError:
            continue
        limit = max(limit, 4 * max_tokens)
    return min(limit, MAX_OUTPUT_TEXT)


def verdict_schema(system: SystemSpec, trace: Trace) -> dict[str, Any]:
    """The JSON schema judge replies are decoded under: flat, with enums and length caps.

    Properties are listed in the order a model should write them (vLLM's grammars keep that
    order): the critique before the numbers, the per-span analysis before the decisive span.
    Each critique is one of the trace's spans: its ``span_id`` picks the branch and the branch
    allows only that span's ``component`` (with separate enums SmolLM2-135M paired span
    'answer' with component 'query', a reply refused, repaired into the same pairing). Any span
    may be blamed; whether ``should_have_output`` suits the span (LLM spans only) is checked by
    ``parse_verdict``, which keeps the schema small.
    """
    span_ids = _unique([s.span_id for s in trace.spans])
    owner = {s.span_id: s.component for s in trace.spans}  # the span parse_verdict checks
    text = {"type": "string", "maxLength": MAX_TEXT}
    unit = {"type": "number", "minimum": 0, "maximum": 1}
    output = {
        "anyOf": [
            {"type": "string", "maxLength": _output_chars(system, trace)},
            {"type": "null"},
        ]
    }

    def critique(span_id: str) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "span_id": {"type": "string", "enum": [span_id]},
                "component": {"type": "string", "enum": [owner[span_id]]},
                "error_type": {"type": "string", "enum": list(ERROR_TYPES)},
                "critique": text,
                "should_have_output": output,
                "blame": unit,
                "confidence": unit,
            },
            "required": [*CRITIQUE_FIELDS],
            "additionalProperties": False,
        }

    items = {"anyOf": [critique(span_id) for span_id in span_ids]}
    return {
        "type": "object",
        "properties": {
            "system_correct": {"type": "boolean"},
            "failure_summary": text,
            "components": {"type": "array", "items": items, "maxItems": max(len(span_ids), 1)},
            "decisive_span_id": {"anyOf": [{"type": "string", "enum": span_ids}, {"type": "null"}]},
        },
        "required": ["system_correct", "failure_summary", "components", "decisive_span_id"],
        "additionalProperties": False,
    }
