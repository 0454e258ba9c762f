"""The LLM judge: per-span critiques of a trace, decoded under a JSON schema (DESIGN.md §5).

The judge only *proposes*: which spans are to blame, why, and (for LLM spans) what they should
have written. Whether a proposal helps is decided later by replaying the system with it.

Flow for a batch of traces (``judge_traces``): one ``engine.generate`` call for every trace × K
samples, constrained by ``verdict_schema`` where the engine supports it; every reply is checked
by ``parse_verdict``; one batched repair call re-asks every reply that failed (except one cut
at ``max_tokens`` while looping: ``prompt.no_repair_reason``); whatever is still invalid is
recorded as a failure of its trace. Bad judge output never raises.

Modules: ``schema`` (the verdict models and their JSON schema), ``prompt`` (the system card,
the judge and repair prompts), ``parse`` (replies as checked verdicts; its docstring lists what
is refused and what is fixed quietly), ``outcome`` (``JudgeOutcome`` and its merges) and
``batch`` (``judge_traces``). ``score`` is the judge as a metric (``metric: judge``): one
0-1 score per final output under the system's rubric, decoded and repaired the same way
(``cotune.scoring`` calls it).

Nothing here imports an ML library.
"""

from cotune.judge.batch import BUDGET_EXHAUSTED, judge_traces
from cotune.judge.outcome import JudgeOutcome
from cotune.judge.parse import JudgeParseError, extract_json, parse_verdict
from cotune.judge.prompt import (
    BAD_REPLY_CHARS,
    INPUT_CHARS,
    SPAN_CHARS,
    clip,
    judge_messages,
    repair_messages,
    system_card,
)
from cotune.judge.schema import (
    ERROR_TYPES,
    MAX_OUTPUT_TEXT,
    MAX_TEXT,
    ComponentCritique,
    ErrorType,
    JudgeVerdict,
    verdict_schema,
)

__all__ = [
    "BAD_REPLY_CHARS",
    "BUDGET_EXHAUSTED",
    "ERROR_TYPES",
    "INPUT_CHARS",
    "MAX_OUTPUT_TEXT",
    "MAX_TEXT",
    "SPAN_CHARS",
    "ComponentCritique",
    "ErrorType",
    "JudgeOutcome",
    "JudgeParseError",
    "JudgeVerdict",
    "clip",
    "extract_json",
    "judge_messages",
    "judge_traces",
    "parse_verdict",
    "repair_messages",
    "system_card",
    "verdict_schema",
]
