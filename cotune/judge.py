"""The LLM judge: per-span critiques of a trace, decoded under a JSON schema (DESIGN.md §5).

The judge only *proposes*: which spans are to blame, why, and (for LLM spans) what they should
have written. Whether a proposal helps is decided later by replaying the system with it.

Flow for a batch of traces (``judge_traces``): one ``engine.generate`` call for every trace × K
samples, constrained by ``verdict_schema`` where the engine supports it; every reply is checked
by ``parse_verdict``; one batched repair call re-asks every reply that failed; whatever is still
invalid is recorded as a failure of its trace. Bad judge output never raises.

``parse_verdict`` rules (what is refused, what is fixed quietly):

- refused (``JudgeParseError``): no JSON object in the text, a schema mismatch (pydantic), an
  unknown ``span_id`` or ``decisive_span_id``, a ``component`` that is not the span's.
- fixed: a ```` ```json ```` fence or prose around the object is ignored (the first decodable
  ``{...}`` block is taken); ``should_have_output`` on a tool span is dropped (set to ``None``:
  a tool's output is not something a model can be trained to write, but blaming the tool is
  still information); an empty ``should_have_output`` becomes ``None``; a span critiqued twice
  keeps its first critique; unknown extra keys are ignored.

Nothing here imports an ML library.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cotune.engines.base import GenerationRequest, GenerationResult, InferenceEngine, Message
from cotune.errors import EngineError
from cotune.runtime import Span, Trace, render_value
from cotune.spec import Component, SystemSpec

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
SPAN_CHARS = 600  # a span's output (and each of its own inputs) in the prompt
INPUT_CHARS = 600  # each task input and gold value in the prompt
BAD_REPLY_CHARS = 1500  # a failed reply quoted back in the repair prompt
BUDGET_EXHAUSTED = "budget exhausted"


class JudgeParseError(ValueError):
    """A judge reply that cannot be used; ``reason`` says why (it goes into the repair prompt)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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


# -- schema -----------------------------------------------------------------------------------


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
    Any span may be blamed; whether ``should_have_output`` suits the span (LLM spans only) is
    checked by ``parse_verdict``, which keeps the schema small.
    """
    span_ids = _unique([s.span_id for s in trace.spans])
    components = _unique([s.component for s in trace.spans])
    text = {"type": "string", "maxLength": MAX_TEXT}
    unit = {"type": "number", "minimum": 0, "maximum": 1}
    critique = {
        "type": "object",
        "properties": {
            "span_id": {"type": "string", "enum": span_ids},
            "component": {"type": "string", "enum": components},
            "error_type": {"type": "string", "enum": list(ERROR_TYPES)},
            "critique": text,
            "should_have_output": {
                "anyOf": [
                    {"type": "string", "maxLength": _output_chars(system, trace)},
                    {"type": "null"},
                ]
            },
            "blame": unit,
            "confidence": unit,
        },
        "required": [
            "span_id",
            "component",
            "error_type",
            "critique",
            "should_have_output",
            "blame",
            "confidence",
        ],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "system_correct": {"type": "boolean"},
            "failure_summary": text,
            "components": {"type": "array", "items": critique, "maxItems": max(len(span_ids), 1)},
            "decisive_span_id": {"anyOf": [{"type": "string", "enum": span_ids}, {"type": "null"}]},
        },
        "required": ["system_correct", "failure_summary", "components", "decisive_span_id"],
        "additionalProperties": False,
    }


# -- prompt -----------------------------------------------------------------------------------


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most about ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    return f"{text[:limit]}… [{cut} more chars]"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _model_name(system: SystemSpec, alias: str | None) -> str:
    if alias is None:
        return "?"
    ref = system.models.get(alias)
    if ref is None:
        return alias
    if ref.name is not None:
        return f"{alias} ({ref.name})" if ref.name != alias else alias
    # A local path: its last part names the model without leaking the machine's layout.
    assert ref.path is not None
    return f"{alias} ({ref.path.rstrip('/').rsplit('/', 1)[-1]})"


def _output_format(component: Component) -> str:
    schema = component.json_schema
    if schema is None:
        return "text"
    return "JSON following " + clip(json.dumps(schema, ensure_ascii=False), 200)


def _arg_text(key: str, value: Any) -> str:
    if key == "url" and isinstance(value, str):
        from urllib.parse import urlsplit

        value = urlsplit(value).netloc or "?"  # the host only: a query string may hold a key
    return f"{key}={value}"


def _card_line(system: SystemSpec, component: Component) -> str:
    flow = f"reads {', '.join(component.reads)} -> writes {component.writes}"
    if component.kind == "tool":
        args = ", ".join(_arg_text(k, v) for k, v in sorted(component.args.items()))
        head = f"- {component.name} [tool: {component.tool}" + (f" ({args})" if args else "")
        return f"{head}; not trainable]: {flow}; output: the tool's result"
    trainable = "trainable" if component.is_trainable else "not trainable"
    line = (
        f"- {component.name} [llm: model {_model_name(system, component.model)}; {trainable}]: "
        f"{flow}; output: {_output_format(component)}"
    )
    assert component.prompt is not None
    line += f"; prompt: {clip(_one_line(component.prompt), 200)!r}"
    if component.system:
        line += f"; system prompt: {clip(_one_line(component.system), 200)!r}"
    return line


def system_card(system: SystemSpec) -> str:
    """The system as the judge sees it: graph, models, trainability, formats, output, metric."""
    lines = [f"System {system.name!r}" + (f": {system.description}" if system.description else "")]
    lines.append(f"Task inputs: {', '.join(system.inputs)}")
    lines.append("Components, in execution order:")
    lines.extend(_card_line(system, c) for c in system.components)
    writer = system.writer_of(system.output)
    lines.append(
        f"Final output: field {system.output!r}"
        + (f" (written by {writer.name!r})" if writer else "")
    )
    if system.metric == "judge":
        lines.append("Metric: judged (no gold comparison)")
    else:
        lines.append(
            f"Metric: {system.metric} against the gold answer(s); a trace passes when its "
            f"score >= {system.pass_threshold:g}"
        )
    return "\n".join(lines)


_SKELETON = (
    '{"system_correct": false, "failure_summary": "...", "components": [{"span_id": "...", '
    '"component": "...", "error_type": "' + "|".join(ERROR_TYPES) + '", "critique": "...", '
    '"should_have_output": "..." or null, "blame": 0.0-1.0, "confidence": 0.0-1.0}], '
    '"decisive_span_id": "..." or null}'
)


def _instructions() -> str:
    return (
        "You are the judge of a compound AI system: you read one run (a trace) of the system "
        "and assign credit for its final output to the spans (component calls) that made it.\n"
        "For each span that contributed to an error (you may skip spans that did nothing "
        "wrong), give: span_id and its component; error_type (one of "
        f"{', '.join(ERROR_TYPES)}); a short critique; blame in [0, 1] (how much this span "
        "caused the failure); confidence in [0, 1]; and should_have_output: for an llm span, "
        "the exact output it should have written instead, in its output format, with nothing "
        "else; null for tool spans or when you cannot tell.\n"
        "decisive_span_id is the earliest span whose error made the final output wrong, or "
        "null when the system is correct.\n"
        "Return only JSON following the schema, with no prose and no code fence:\n" + _SKELETON
    )


def _render(value: Any) -> str:
    return render_value(value) if not isinstance(value, str) else value


def _describe_input(trace: Trace, span: Span, name: str, value: Any) -> str:
    """A span's input, by reference where it is a task input or an earlier span's output."""
    if name in trace.inputs and trace.inputs[name] == value:
        return f"{name} = (task input {name})"
    for earlier in trace.spans:
        if earlier is span:
            break
        if earlier.writes == name and earlier.output == value:
            return f"{name} = (output of span {earlier.span_id})"
    return f"{name} = {clip(_render(value), SPAN_CHARS)}"


def _span_block(trace: Trace, index: int, span: Span) -> str:
    what = "llm" if span.kind == "llm" else "tool"
    lines = [f"[{index}] span_id={span.span_id} component={span.component} ({what})"]
    if span.inputs:
        lines.append(
            "inputs: "
            + "; ".join(_describe_input(trace, span, k, v) for k, v in span.inputs.items())
        )
    lines.append(f"output ({span.writes}): {clip(_render(span.output), SPAN_CHARS)}")
    if span.error:
        lines.append(f"error: {clip(span.error, 200)}")
    return "\n".join(lines)


def judge_messages(system: SystemSpec, trace: Trace, *, include_gold: bool) -> list[Message]:
    """The judge's prompt for one trace. Gold answers and the score only when ``include_gold``."""
    system_message = f"{_instructions()}\n\n{system_card(system)}"
    parts = ["Task input:"]
    for name, value in trace.inputs.items():
        parts.append(f"{name}: {clip(_render(value), INPUT_CHARS)}")
    if include_gold and trace.expected:
        gold = " | ".join(clip(g, INPUT_CHARS) for g in trace.expected[:5])
        parts.append(f"Gold answer(s) (metric {system.metric}): {gold}")
    parts.append(f"Final output ({system.output}): {clip(_render(trace.output), SPAN_CHARS)}")
    if include_gold and trace.score is not None:
        verdict = "" if trace.passed is None else (" (passed)" if trace.passed else " (failed)")
        parts.append(f"Score: {trace.score:g}{verdict}")
    parts.append("Spans, in order:")
    parts.extend(_span_block(trace, i + 1, span) for i, span in enumerate(trace.spans))
    parts.append("Return the JSON verdict now.")
    return [
        {"role": "system", "content": system_message},
        {"role": "user", "content": "\n".join(parts)},
    ]


def repair_messages(
    original_messages: Sequence[Message], bad_text: str, reason: str
) -> list[Message]:
    """The one repair attempt: the original prompt, the bad reply, and what was wrong with it."""
    return [
        *original_messages,
        {"role": "assistant", "content": clip(bad_text, BAD_REPLY_CHARS)},
        {
            "role": "user",
            "content": (
                f"That reply cannot be used: {reason}. Return only the corrected JSON object "
                "following the schema, with no prose and no code fence."
            ),
        },
    ]


# -- parsing ----------------------------------------------------------------------------------

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


def _pydantic_reason(err: ValidationError) -> str:
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
        raise JudgeParseError(_pydantic_reason(err)) from None
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


# -- outcomes ---------------------------------------------------------------------------------


def _same_output(proposed: str, original: Any) -> bool:
    text = proposed.strip()
    if isinstance(original, str):
        return text == original.strip()
    try:
        return bool(json.loads(text) == original)
    except json.JSONDecodeError:
        return text == render_value(original).strip()


@dataclass
class JudgeOutcome:
    """Every judge sample for one trace: the valid verdicts, why the others failed, the raw
    replies (repairs included, in order) and the requests spent on it.

    ``span_ids`` (span order) and ``llm_outputs`` (each LLM span's original output) come from
    the trace; the merges below need them.
    """

    trace_id: str
    verdicts: list[JudgeVerdict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    calls: int = 0
    span_ids: list[str] = field(default_factory=list)
    llm_outputs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_trace(cls, trace: Trace) -> JudgeOutcome:
        return cls(
            trace_id=trace.trace_id,
            span_ids=[s.span_id for s in trace.spans],
            llm_outputs={s.span_id: s.output for s in trace.spans if s.kind == "llm"},
        )

    @property
    def ok(self) -> bool:
        return bool(self.verdicts)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (stage outputs are persisted); ``from_json`` reads it back."""
        return {
            "trace_id": self.trace_id,
            "verdicts": [v.model_dump(mode="json") for v in self.verdicts],
            "failures": list(self.failures),
            "raw": list(self.raw),
            "calls": self.calls,
            "span_ids": list(self.span_ids),
            "llm_outputs": dict(self.llm_outputs),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JudgeOutcome:
        return cls(
            trace_id=data["trace_id"],
            verdicts=[JudgeVerdict.model_validate(v) for v in data.get("verdicts", [])],
            failures=list(data.get("failures", [])),
            raw=list(data.get("raw", [])),
            calls=int(data.get("calls", 0)),
            span_ids=list(data.get("span_ids", [])),
            llm_outputs=dict(data.get("llm_outputs", {})),
        )

    def _order(self) -> list[str]:
        order = list(self.span_ids)
        for verdict in self.verdicts:
            order.extend(c.span_id for c in verdict.components if c.span_id not in order)
        return order

    def merged_blame(self) -> dict[str, float]:
        """Each span's blame, averaged over the valid verdicts (a span a verdict does not
        critique counts as 0 in it). Empty when there is no valid verdict."""
        if not self.verdicts:
            return {}
        merged: dict[str, float] = {}
        for span_id in self._order():
            total = 0.0
            for verdict in self.verdicts:
                item = verdict.critique(span_id)
                total += item.blame if item is not None else 0.0
            merged[span_id] = total / len(self.verdicts)
        return merged

    def decisive_span(self) -> str | None:
        """The decisive span most verdicts name; ``None`` ("nothing failed") is a vote too but
        loses ties to a span. Ties between spans go to the higher mean blame, then the earlier
        span."""
        if not self.verdicts:
            return None
        votes = Counter(v.decisive_span_id for v in self.verdicts)
        top = max(votes.values())
        tied = [s for s, n in votes.items() if n == top and s is not None]
        if not tied:
            return None
        blame = self.merged_blame()
        order = self._order()
        return min(
            tied,
            key=lambda s: (-blame.get(s, 0.0), order.index(s) if s in order else len(order)),
        )

    def proposals(self) -> list[tuple[str, str, str]]:
        """``(span_id, should_have_output, critique)`` for every distinct proposed output of an
        LLM span that differs from what the span wrote, in verdict order."""
        found: list[tuple[str, str, str]] = []
        seen: set[tuple[str, str]] = set()
        for verdict in self.verdicts:
            for item in verdict.components:
                proposed = item.should_have_output
                if proposed is None or not proposed.strip():
                    continue
                if item.span_id not in self.llm_outputs:
                    continue
                key = (item.span_id, proposed.strip())
                if key in seen or _same_output(proposed, self.llm_outputs[item.span_id]):
                    continue
                seen.add(key)
                found.append((item.span_id, proposed.strip(), item.critique))
        return found


# -- the batch --------------------------------------------------------------------------------


@dataclass
class _Sample:
    outcome: JudgeOutcome
    trace: Trace
    index: int
    request: GenerationRequest
    text: str = ""


def _try_parse(
    sample: _Sample, text: str, system: SystemSpec, finish_reason: str | None
) -> str | None:
    """Record ``text`` as the sample's reply; keep its verdict, or return why it failed."""
    sample.text = text
    sample.outcome.calls += 1
    sample.outcome.raw.append(text)
    try:
        verdict = parse_verdict(text, system, sample.trace)
    except JudgeParseError as err:
        if finish_reason == "length":
            return f"{err.reason} (the reply was cut at max_tokens)"
        return err.reason
    sample.outcome.verdicts.append(verdict)
    return None


def _generate(
    engine: InferenceEngine, requests: list[GenerationRequest]
) -> tuple[list[GenerationResult], str | None]:
    """The engine's replies, or why the call failed: an ``EngineError`` (a judge endpoint that
    is down, a request it refuses) fails the batch's samples instead of the job stage."""
    try:
        return engine.generate(requests), None
    except EngineError as err:
        return [], f"engine error: {err}"


def judge_traces(
    engine: InferenceEngine,
    system: SystemSpec,
    traces: Sequence[Trace],
    *,
    samples: int,
    temperature: float,
    max_tokens: int,
    seed: int,
    include_gold: bool = True,
    max_calls: int | None = None,
) -> list[JudgeOutcome]:
    """Judge ``traces`` with K = ``samples`` replies each; one outcome per trace, in order.

    Requests: one batched ``generate`` for every admitted trace × K (greedy when K == 1,
    otherwise ``temperature`` with seeds ``seed + i``), then at most one batched repair call
    for the replies that failed to parse. ``max_calls`` caps the requests: a trace is admitted
    only if all K of its samples fit (traces past that get ``failures=["budget exhausted"]``);
    what is left of the budget pays for repairs, in order, and a reply that finds none left
    fails without one. Bad replies, and an ``EngineError`` from either call, are recorded as
    failures in their outcomes (a failed call still counts its requests); nothing here raises
    for them.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    outcomes = [JudgeOutcome.for_trace(t) for t in traces]
    budget = 2 * samples * len(traces) if max_calls is None else max(max_calls, 0)
    admitted = min(len(traces), budget // samples)
    for outcome in outcomes[admitted:]:
        outcome.failures.append(BUDGET_EXHAUSTED)
    budget -= admitted * samples

    use_schema = engine.supports_json_schema()
    sample_temperature = 0.0 if samples == 1 else temperature
    batch: list[_Sample] = []
    for outcome, trace in zip(outcomes[:admitted], traces[:admitted], strict=True):
        messages = judge_messages(system, trace, include_gold=include_gold)
        schema = verdict_schema(system, trace) if use_schema else None
        for i in range(samples):
            request = GenerationRequest(
                messages=messages,
                max_tokens=max_tokens,
                temperature=sample_temperature,
                seed=seed + i,
                json_schema=schema,
            )
            batch.append(_Sample(outcome, trace, i, request))
    if not batch:
        return outcomes

    results, error = _generate(engine, [s.request for s in batch])
    if error is not None:
        for sample in batch:
            sample.outcome.calls += 1
            sample.outcome.failures.append(f"sample {sample.index}: {error}")
        return outcomes
    to_repair: list[tuple[_Sample, str]] = []
    for sample, result in zip(batch, results, strict=True):
        reason = _try_parse(sample, result.text, system, result.finish_reason)
        if reason is None:
            continue
        if budget <= 0:
            sample.outcome.failures.append(
                f"sample {sample.index}: {reason}; no budget left for a repair"
            )
            continue
        budget -= 1
        to_repair.append((sample, reason))
    if not to_repair:
        return outcomes

    repairs = [
        GenerationRequest(
            messages=repair_messages(sample.request.messages, sample.text, reason),
            max_tokens=sample.request.max_tokens,
            temperature=sample.request.temperature,
            seed=sample.request.seed,
            json_schema=sample.request.json_schema,
        )
        for sample, reason in to_repair
    ]
    results, error = _generate(engine, repairs)
    if error is not None:
        for sample, reason in to_repair:
            sample.outcome.calls += 1
            sample.outcome.failures.append(f"sample {sample.index}: {reason}; repair: {error}")
        return outcomes
    for (sample, reason), result in zip(to_repair, results, strict=True):
        again = _try_parse(sample, result.text, system, result.finish_reason)
        if again is not None:
            sample.outcome.failures.append(
                f"sample {sample.index}: {reason}; after repair: {again}"
            )
    return outcomes
