"""Every judge sample for one trace (``JudgeOutcome``) and the merges over its verdicts."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cotune.judge.schema import JudgeVerdict
from cotune.prompts import render_value
from cotune.runtime import Trace


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
        for verdict in self.verdict_proposals():
            for span_id, proposed, critique in verdict:
                if (span_id, proposed) not in seen:
                    seen.add((span_id, proposed))
                    found.append((span_id, proposed, critique))
        return found

    def verdict_proposals(self) -> list[list[tuple[str, str, str]]]:
        """Per valid verdict, ``(span_id, should_have_output, critique)`` for each LLM span it
        proposes an output for that differs from what the span wrote: one verdict's fixes
        belong together (joint candidates, ``cotune.verify.joint_proposals``)."""
        found = []
        for verdict in self.verdicts:
            fixes = []
            for item in verdict.components:
                proposed = item.should_have_output
                if proposed is None or not proposed.strip():
                    continue
                if item.span_id not in self.llm_outputs:
                    continue
                if _same_output(proposed, self.llm_outputs[item.span_id]):
                    continue
                fixes.append((item.span_id, proposed.strip(), item.critique))
            found.append(fixes)
        return found
