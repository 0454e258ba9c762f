"""The judge's prompt: the system card, one trace's spans, and the repair prompt."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from cotune.engines.base import GenerationRequest, Message
from cotune.judge.parse import JudgeParseError, extract_json
from cotune.judge.schema import ERROR_TYPES
from cotune.prompts import render_value
from cotune.runtime import Span, Trace
from cotune.spec import Component, SystemSpec

SPAN_CHARS = 600  # a span's output (and each of its own inputs) in the prompt
INPUT_CHARS = 600  # each task input and gold value in the prompt
BAD_REPLY_CHARS = 1500  # a failed reply quoted back in the repair prompt
LOOP_TAIL = 96  # a reply cut at max_tokens with this many chars repeating one unit loops
LOOP_UNIT = 12  # the longest repeated unit looked for: at least 8 repeats in LOOP_TAIL
NOT_REPAIRED = "not repaired"  # starts no_repair_reason's reason (a failure's last part)
_NUMBER = re.compile(r"\d+")  # masked as "#" to see a loop that counts on: "No.1, No.2, ..."


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
    if component.chat:
        line += f"; prompt: the conversation in {component.reads[0]!r}, as it is"
    else:
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
        lines.append(
            f"Metric: a judge scores the final output 0-1 against the rubric "
            f"{clip(_one_line(system.rubric or ''), 400)!r}; a trace passes when its score "
            f">= {system.pass_threshold:g}"
        )
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


def render_text(value: Any) -> str:
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
    return f"{name} = {clip(render_text(value), SPAN_CHARS)}"


def _span_block(trace: Trace, index: int, span: Span) -> str:
    what = "llm" if span.kind == "llm" else "tool"
    lines = [f"[{index}] span_id={span.span_id} component={span.component} ({what})"]
    if span.inputs:
        lines.append(
            "inputs: "
            + "; ".join(_describe_input(trace, span, k, v) for k, v in span.inputs.items())
        )
    lines.append(f"output ({span.writes}): {clip(render_text(span.output), SPAN_CHARS)}")
    if span.error:
        lines.append(f"error: {clip(span.error, 200)}")
    return "\n".join(lines)


def _feedback_lines(trace: Trace) -> list[str]:
    """A rated run's system-level feedback, for the judge to turn into per-component
    critiques; what of the trace was reconstructed rather than recorded."""
    assert trace.feedback is not None
    lines = [f"A person rated this final output {trace.feedback.rating:g} (0 bad, 1 good)."]
    if trace.feedback.comment:
        lines.append(
            f"Their comment on it: {clip(trace.feedback.comment, INPUT_CHARS)}\n"
            "Turn this comment into critiques of the spans that caused what it describes."
        )
    if any(span.reconstructed for span in trace.spans):
        lines.append(
            "The spans before the final output were reconstructed by running the system again "
            "on the same input; the final output is the one the person rated."
        )
    return lines


def judge_messages(system: SystemSpec, trace: Trace, *, include_gold: bool) -> list[Message]:
    """The judge's prompt for one trace. Gold answers and the score only when ``include_gold``."""
    system_message = f"{_instructions()}\n\n{system_card(system)}"
    parts = ["Task input:"]
    for name, value in trace.inputs.items():
        parts.append(f"{name}: {clip(render_text(value), INPUT_CHARS)}")
    if include_gold and trace.expected:
        gold = " | ".join(clip(g, INPUT_CHARS) for g in trace.expected[:5])
        parts.append(f"Gold answer(s) (metric {system.metric}): {gold}")
    parts.append(f"Final output ({system.output}): {clip(render_text(trace.output), SPAN_CHARS)}")
    if include_gold and trace.score is not None:
        verdict = "" if trace.passed is None else (" (passed)" if trace.passed else " (failed)")
        parts.append(f"Score: {trace.score:g}{verdict}")
    if trace.score_reason:
        parts.append(f"Why it got that score: {clip(trace.score_reason, SPAN_CHARS)}")
    if trace.feedback is not None:
        parts.extend(_feedback_lines(trace))
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


def cut_note(reason: str, finish_reason: str | None) -> str:
    """A parse failure's reason, saying so when the reply was cut at ``max_tokens``."""
    return f"{reason} (the reply was cut at max_tokens)" if finish_reason == "length" else reason


def repetition_unit(text: str) -> str | None:
    """The short unit ``text`` repeats somewhere (``"1."`` for ``...1.1.1.1.1.``), or None:
    the first run of ``LOOP_TAIL`` characters that is periodic with a period of at most
    ``LOOP_UNIT`` (the smallest such period; the unit is the run's first period). A loop that
    counts on (``No.0, No.1, ... No.47``, ``13; 14; 15; ...``) is found with every number
    written ``#`` and each number larger than the one a period before; its unit is given so
    (``" No.#,"``). A list whose numbers do not rise (``0.00, 0.14, 0.29``, dates, ids in any
    order) is not taken for one; a sorted list of ids would be."""
    literal = _periodic_run(text)
    if literal is not None:
        return literal
    masked, values, where = _numbers_masked(text)
    return _periodic_run(masked, values, where)


def _numbers_masked(text: str) -> tuple[str, list[int], list[int]]:
    """``text`` with each number written ``#``, the numbers' values, and for each character of
    the masked text the index of its number (-1 for other characters)."""
    parts: list[str] = []
    values: list[int] = []
    where: list[int] = []
    last = 0
    for match in _NUMBER.finditer(text):
        parts.append(text[last : match.start()])
        where.extend([-1] * (match.start() - last))
        parts.append("#")
        where.append(len(values))
        values.append(int(match.group()[-18:]))  # the low digits suffice to see a count rise
        last = match.end()
    parts.append(text[last:])
    where.extend([-1] * (len(text) - last))
    return "".join(parts), values, where


def _periodic_run(text: str, values: Sequence[int] = (), where: Sequence[int] = ()) -> str | None:
    """The unit of ``text``'s first periodic run of ``LOOP_TAIL`` characters; with ``values``
    and ``where`` (``_numbers_masked``), a ``#`` repeats only where its number rose."""
    for period in range(1, LOOP_UNIT + 1):
        run = 0  # how many characters in a row equal the one a period before
        for i in range(period, len(text)):
            same = text[i] == text[i - period]
            if same and values and where[i] >= 0:  # a number: it must rise to count on
                same = values[where[i]] > values[where[i - period]]
            run = run + 1 if same else 0
            if run == LOOP_TAIL - period:
                start = i - LOOP_TAIL + 1
                return text[start : start + period]
    return None


def no_repair_reason(bad_text: str, finish_reason: str | None) -> str | None:
    """Why a failed reply is not worth a repair, or None when it is.

    A reply cut at ``max_tokens`` before its JSON object closed that fell into a loop somewhere
    (a run repeating one short unit: a small judge's degenerate critique of ``1.1.1.1...``, or
    a run of whitespace) is not repaired: the repair asks the same model, primed with the start
    of that reply, under the same budget, and it looped again in every such case measured (12
    of 12 in an object-count credit stage with SmolLM2-135M as the judge, at 4.6k of the
    stage's 14.6k generated tokens; each looped in a field the schema's ``maxLength`` closed,
    then was cut in the next one). So is one that counts on until cut (``No.0, No.1, ...``):
    2 of kb-qa's 3 repairs in the speed benchmark, each copied and cut again. A reply whose
    object is complete (it failed only validation), a long one that never loops, or one that
    failed for another reason is repaired.
    """
    if finish_reason != "length":
        return None
    unit = repetition_unit(bad_text)
    if unit is None:
        return None
    try:
        extract_json(bad_text)
    except JudgeParseError:
        return f"{NOT_REPAIRED}: it loops on {unit!r}"
    return None  # a complete object, then a loop: the repair may fix its fields


def repair_request(request: GenerationRequest, bad_text: str, reason: str) -> GenerationRequest:
    """The repair of one bad reply: its request's settings, :func:`repair_messages` as prompt."""
    return GenerationRequest(
        messages=repair_messages(request.messages, bad_text, reason),
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        seed=request.seed,
        json_schema=request.json_schema,
    )
