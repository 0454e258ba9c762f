"""From traces and verified corrections to training rows, per trainable component.

Sources, in order of trust: spans of traces that passed (bootstrapping, as in DSPy's
BootstrapFinetune; a rated-good run of ``data.feedback`` is such a trace, minus any span
reconstructed by a re-run), verified corrections (single and needed joint members) and the
downstream spans of the corrected replays, then augmentation (more sampled rollouts: the spans
of those that pass, and the verified corrections of those that fail, ``augment-`` rows). DPO pairs
contrast a verified correction with the original output. Rows are rendered from a span's own
messages, so a prompt holds only what the component saw: never a critique, never a gold answer
it was not given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from cotune.data import Example
from cotune.prompts import render_messages, render_value
from cotune.records import BufferCount, BufferRows, Candidate
from cotune.runtime import Span, Trace
from cotune.spec import SystemSpec
from cotune.training import DPOPair, SFTRow


@dataclass
class Buffer:
    """The cumulative training data of a job, per component."""

    sft: dict[str, list[SFTRow]] = field(default_factory=dict)
    dpo: dict[str, list[DPOPair]] = field(default_factory=dict)

    # Keys of the rows already held, so a duplicate is found without re-serialising the buffer.
    _seen: set[tuple[str, str, str]] = field(default_factory=set, repr=False)
    # While ``only`` is open: how many more new rows ("sft") and pairs ("dpo") each component
    # may take; a component not named takes none.
    _room: dict[str, dict[str, int]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for component, rows in self.sft.items():
            self._seen.update(("sft", component, _row_key(r.messages, r.completion)) for r in rows)
        for component, pairs in self.dpo.items():
            self._seen.update(("dpo", component, _pair_key(p)) for p in pairs)

    @contextmanager
    def only(self, room: Mapping[str, int]) -> Iterator[None]:
        """While open, new rows go only to the components in ``room``, at most that many rows
        and that many pairs each: augmentation fills what a component is short of, no more."""
        self._room = {"sft": dict(room), "dpo": dict(room)}
        try:
            yield
        finally:
            self._room = None

    def _take_room(self, kind: str, component: str) -> bool:
        if self._room is None:
            return True
        left = self._room[kind].get(component, 0)
        if left <= 0:
            return False
        self._room[kind][component] = left - 1
        return True

    def add_sft(self, component: str, row: SFTRow) -> bool:
        key = ("sft", component, _row_key(row.messages, row.completion))
        if key in self._seen or not self._take_room("sft", component):
            return False
        self._seen.add(key)
        self.sft.setdefault(component, []).append(row)
        return True

    def add_pair(self, component: str, pair: DPOPair) -> bool:
        key = ("dpo", component, _pair_key(pair))
        if key in self._seen or not self._take_room("dpo", component):
            return False
        self._seen.add(key)
        self.dpo.setdefault(component, []).append(pair)
        return True

    def counts(self) -> dict[str, BufferCount]:
        names = set(self.sft) | set(self.dpo)
        return {
            n: BufferCount(samples=len(self.sft.get(n, [])), pairs=len(self.dpo.get(n, [])))
            for n in sorted(names)
        }

    def rows(self) -> BufferRows:
        """The rows as the synthesize stage stores them."""
        return BufferRows(
            sft={c: list(rows) for c, rows in self.sft.items()},
            dpo={c: list(pairs) for c, pairs in self.dpo.items()},
        )

    @classmethod
    def from_rows(cls, rows: BufferRows) -> Buffer:
        """A buffer to add to, holding ``rows`` (copied: the stored output stays as it was)."""
        return cls(
            sft={c: list(r) for c, r in rows.sft.items()},
            dpo={c: list(p) for c, p in rows.dpo.items()},
        )


def _pair_key(pair: DPOPair) -> str:
    return _row_key(pair.messages, pair.chosen + "\x00" + pair.rejected)


def _row_key(messages: Sequence[dict[str, str]], completion: str) -> str:
    return json.dumps([list(messages), completion.strip()], sort_keys=True)


def as_completion(value: Any) -> str:
    """A span output as the text a component should produce (JSON stays JSON)."""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return render_value(value)


def leaks_gold(span: Span, completion: str, expected: Sequence[str] | None) -> bool:
    """True when ``completion`` states a gold answer that the span's inputs never showed it.

    The final answer writer is exempt (producing the gold is its job); an upstream component
    that learned to emit answers it could not know would be learning the judge's hindsight.
    """
    if not expected:
        return False
    seen = " ".join(render_value(v) for v in span.inputs.values()).lower()
    said = completion.lower()
    return any(g.strip() and g.lower() in said and g.lower() not in seen for g in expected)


def training_spans(system: SystemSpec, trace: Trace) -> Iterable[Span]:
    trainable = {c.name for c in system.trainable_components}
    for span in trace.spans:
        if span.kind == "llm" and span.component in trainable and span.messages:
            yield span


def add_bootstrap(
    buffer: Buffer, system: SystemSpec, traces: Iterable[Trace], source: str = "bootstrap"
) -> dict[str, int]:
    """Every trainable span of a passing trace becomes an SFT row, except a span that a
    re-run reconstructed for a rated run (its output is not what the rated output came of)."""
    added: dict[str, int] = {}
    for trace in traces:
        if not trace.passed:
            continue
        for span in training_spans(system, trace):
            if span.reconstructed:
                continue
            assert span.messages is not None
            row = SFTRow(span.messages, as_completion(span.output), source)
            if buffer.add_sft(span.component, row):
                added[span.component] = added.get(span.component, 0) + 1
    return added


def add_corrections(
    buffer: Buffer,
    system: SystemSpec,
    traces_by_id: dict[str, Trace],
    replays_by_candidate: dict[int, Trace],
    candidates: Sequence[Candidate],
    final_component: str | None,
    prefix: str = "",
) -> dict[str, int]:
    """Verified corrections (SFT rows + DPO pairs) and the passing downstream spans of their
    replays. ``replays_by_candidate`` maps a candidate's index to its replay trace. A joint
    member's prompt is its span in the joint's replay (an upstream member's is its own span
    as it was; the final writer's saw the corrected inputs). A gold target ("gold" source)
    is kept only where that prompt's inputs admit it (``cotune.verify.hindsight_target``).
    ``prefix`` goes before the rows' sources ("augment-" for augmentation's corrections)."""
    from cotune.verify import hindsight_target

    added: dict[str, int] = {}
    trainable = {c.name for c in system.trainable_components}
    for index, candidate in enumerate(candidates):
        if not candidate.accepted or candidate.component not in trainable:
            continue
        original = traces_by_id[candidate.trace_id]
        replay = replays_by_candidate.get(index)
        if candidate.kind == "joint":
            if replay is None:
                continue
            span = replay.span(candidate.component)
        else:
            span = original.span(candidate.component)
        chosen = as_completion(candidate.proposed_output)
        rejected = as_completion(candidate.original_output)
        if span.messages is None:
            continue
        if candidate.component != final_component and leaks_gold(span, chosen, original.expected):
            continue
        if candidate.source == "gold" and hindsight_target(span, original.expected) != chosen:
            continue
        row = SFTRow(span.messages, chosen, f"{prefix}correction")
        if buffer.add_sft(candidate.component, row):
            added[candidate.component] = added.get(candidate.component, 0) + 1
        if chosen.strip() != rejected.strip():
            buffer.add_pair(candidate.component, DPOPair(span.messages, chosen, rejected))
        if replay is not None and replay.passed:
            for downstream in training_spans(system, replay):
                if downstream.rerun and downstream.messages:
                    row = SFTRow(
                        downstream.messages,
                        as_completion(downstream.output),
                        f"{prefix}downstream",
                    )
                    if buffer.add_sft(downstream.component, row):
                        added[downstream.component] = added.get(downstream.component, 0) + 1
    return added


def check_sources(traces: Iterable[Trace], train_ids: set[str]) -> None:
    """Val and test examples never feed synthesis: ``train_ids`` are the ids that may (the
    train examples' and the rated runs' of ``data.feedback``, whose ids may not be a val or
    test example's: ``JobContext.feedback``)."""
    for trace in traces:
        if trace.example_id not in train_ids:
            raise ValueError(
                f"trace {trace.trace_id} is of example {trace.example_id!r}, "
                "which is not a train example; it may not feed synthesis"
            )


def given_rows(system: SystemSpec, examples: Iterable[Example]) -> Buffer:
    """``train.rows: given``: each train example's gold output is an SFT row of the system's
    one component (its first accepted answer), a ``rejected`` output a DPO pair against it."""
    component = system.trainable_components[0]
    buffer = Buffer()
    for example in examples:
        if not example.expected:
            continue
        messages = [dict(m) for m in render_messages(component, example.inputs)]
        chosen = example.expected[0]
        buffer.add_sft(component.name, SFTRow(messages, chosen, "given"))
        if example.rejected is not None and example.rejected.strip() != chosen.strip():
            buffer.add_pair(component.name, DPOPair(messages, chosen, example.rejected))
    return buffer


def target_rows(system: SystemSpec, examples: Iterable[Example]) -> Buffer:
    """``train.rows: targets``: teacher forcing on the data's ideal values. Per example, the
    ideal values are its ``targets`` (by field) and, for the system's output field, its first
    gold answer; every trainable component whose written field has one gets an SFT row whose
    prompt is rendered from the example's inputs and the ideal values of the fields it reads
    (never from a component's real output). A component reading a field without an ideal
    value gets no row from that example. These prompts hold what no real job knows, so the
    rows are an oracle's (an upper reference), exempt from ``leaks_gold`` by design."""
    buffer = Buffer()
    for example in examples:
        ideal = dict(example.targets or {})
        if system.output not in ideal and example.expected:
            ideal[system.output] = example.expected[0]
        values = {**ideal, **example.inputs}
        for component in system.trainable_components:
            if component.writes not in ideal or any(f not in values for f in component.reads):
                continue
            messages = [dict(m) for m in render_messages(component, values)]
            row = SFTRow(messages, as_completion(ideal[component.writes]), "target")
            buffer.add_sft(component.name, row)
    return buffer
