"""Simulated human feedback: turn a system's scored runs into a ``data.feedback`` file.

A person who knows the right answer rates each run and says, coarsely, what is wrong: the
quality benchmark's ``feedback`` variant (``benchmarks/gold_hidden.py``) trains on what this
writes instead of on gold. Each run's gold comparison (its ``passed`` under the task metric)
becomes a rating (``up`` when right, ``down`` when wrong) and a comment from a fixed set per
task that **never carries the gold value**: the row holds the run's inputs, its output, its
spans (every component's output, as ``cotune eval --out`` writes them) and that feedback,
nothing else (``check_no_gold`` refuses a wrong run's feedback that holds its gold).

Comment rules, per task:

- ``object-count`` (BIG-bench object_counting): "the answer is not a number"; else "the
  count is too low" / "the count is too high", plus "an item of another kind was counted"
  when the extracted items name a thing of another kind than the question asks about, and
  "an item of the asked kind was left out" when the question lists a thing of the asked kind
  the extracted items do not name (the simulated person knows which things are animals,
  fruits, ...: ``KINDS``); a right run gets "the count is right".
- every other task: "the answer is right" / "the answer is wrong" (``GENERIC``).

    # the base system once on the job's train split:
    python benchmarks/simulate_feedback.py --task object-count \
        --job examples/object-count/job.yaml --out feedback.jsonl
    # or rate the traces a base run wrote (with expected), e.g. cotune eval --out's:
    python benchmarks/simulate_feedback.py --task object-count \
        --traces traces.jsonl --system examples/object-count/system.yaml --out feedback.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# What the simulated person knows about BIG-bench object_counting's things (its whole
# vocabulary, singular forms; plurals add "s" unless IRREGULAR says otherwise).
KINDS: dict[str, tuple[str, ...]] = {
    "animals": (
        "bear", "cat", "chicken", "cow", "dog", "donkey", "duck", "fish", "frog", "goat",
        "mouse", "pig", "rabbit", "snail", "snake",
    ),
    "fruits": (
        "apple", "banana", "blackberry", "grape", "nectarine", "orange", "peach", "plum",
        "raspberry", "strawberry",
    ),
    "vegetables": (
        "broccoli", "cabbage", "carrot", "cauliflower", "celery", "garlic", "lettuce", "onion",
        "potato", "yam",
    ),
    "musical instruments": (
        "accordion", "clarinet", "drum", "flute", "piano", "trombone", "trumpet", "violin",
    ),
    "objects": (
        "bed", "car", "chair", "couch", "fridge", "lamp", "microwave", "oven", "stove", "table",
        "toaster",
    ),
}  # fmt: skip
IRREGULAR = {
    "mouse": "mice",
    "peach": "peaches",
    "couch": "couches",
    "potato": "potatoes",
    "blackberry": "blackberries",
    "raspberry": "raspberries",
    "strawberry": "strawberries",
    "fish": "fish",
}
ASKED = re.compile(r"How many (.+?) do I have", re.IGNORECASE)

RIGHT, WRONG = "up", "down"
GENERIC = {RIGHT: "the answer is right", WRONG: "the answer is wrong"}
COUNT_RIGHT = "the count is right"
NOT_A_NUMBER = "the answer is not a number"
TOO_LOW, TOO_HIGH = "the count is too low", "the count is too high"
OTHER_KIND = "an item of another kind was counted"
LEFT_OUT = "an item of the asked kind was left out"
# Every comment this script can write (object-count joins some with "; "): none holds a number.
COMMENTS = (*GENERIC.values(), COUNT_RIGHT, NOT_A_NUMBER, TOO_LOW, TOO_HIGH, OTHER_KIND, LEFT_OUT)


def _forms() -> dict[str, tuple[str, str]]:
    """Each written form of a thing -> (its kind, its singular)."""
    forms: dict[str, tuple[str, str]] = {}
    for kind, things in KINDS.items():
        for thing in things:
            for form in (thing, IRREGULAR.get(thing, thing + "s")):
                forms[form] = (kind, thing)
    return forms


FORMS = _forms()
_THING = re.compile(r"\b(" + "|".join(sorted(FORMS, key=len, reverse=True)) + r")\b")


def things(text: str) -> set[tuple[str, str]]:
    """The (kind, thing) pairs ``text`` names."""
    return {FORMS[m] for m in _THING.findall(text.lower())}


def _number(text: str) -> int | None:
    stripped = text.strip().rstrip(".")
    return int(stripped) if stripped.isdigit() else None


def object_count_comment(question: str, items: str, output: str, gold: str) -> str:
    """The comment on one object-count run: what is wrong, never by how much or the count."""
    said, right = _number(output), _number(gold)
    if right is None:
        raise ValueError(f"object-count gold must be digits, got {gold!r}")
    if said is None:
        return NOT_A_NUMBER
    if said == right:
        return COUNT_RIGHT
    parts = [TOO_LOW if said < right else TOO_HIGH]
    asked = ASKED.search(question)
    kind = asked.group(1).lower() if asked else None
    if kind in KINDS:
        named = things(items)
        if any(k != kind for k, _ in named):
            parts.append(OTHER_KIND)
        if any(k == kind and (k, t) not in named for k, t in things(question)):
            parts.append(LEFT_OUT)
    return "; ".join(parts)


def comment_for(task: str, trace: Any, system: Any) -> str:
    """The task's comment on a scored trace (``trace.expected`` is its gold)."""
    from cotune.metrics import as_text

    passed = bool(trace.passed)
    if task != "object-count":
        return GENERIC[RIGHT if passed else WRONG]
    fields = trace.fields()
    writer = next(c for c in system.components if c.writes == system.output)
    upstream = [fields.get(name) for name in writer.reads]
    return object_count_comment(
        " ".join(as_text(v) for v in trace.inputs.values()),
        " ".join(as_text(v) for v in upstream),
        as_text(trace.output),
        trace.expected[0],
    )


def _gold_patterns(gold: Sequence[str]) -> list[re.Pattern[str]]:
    """A gold answer as a whole word (digits also as their number word, 0-20)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from data import NUMBER_WORDS
    finally:
        sys.path.pop(0)
    words = {str(v): w for w, v in NUMBER_WORDS.items()}
    texts = {g.strip().lower() for g in gold if g.strip()}
    texts |= {words[t] for t in texts if t in words}
    return [re.compile(rf"(?<![\w]){re.escape(t)}(?![\w])") for t in texts]


def holds_gold(value: Any, gold: Sequence[str]) -> bool:
    """Whether ``value`` (dumped as JSON, lowercased) names a gold answer as a whole word."""
    text = json.dumps(value, ensure_ascii=False).lower()
    return any(p.search(text) for p in _gold_patterns(gold))


def check_no_gold(row: dict[str, Any], gold: Sequence[str]) -> None:
    """A wrong run's feedback must not give its gold away."""
    if row["feedback"]["rating"] == WRONG and holds_gold(row["feedback"], gold):
        raise ValueError(f"row {row['id']}: the feedback holds the gold answer {list(gold)}")


def feedback_row(task: str, trace: Any, system: Any) -> dict[str, Any] | None:
    """One rated run (``cotune.feedback``'s row format) from a trace scored against gold;
    None for a run that gave no output (it cannot be a fixed trace)."""
    if trace.output is None or trace.passed is None or not trace.expected:
        return None
    rating = RIGHT if trace.passed else WRONG
    row = {
        "id": trace.example_id,
        "inputs": dict(trace.inputs),
        "output": trace.output,
        "feedback": {"rating": rating, "comment": comment_for(task, trace, system)},
        "spans": [span.model_dump(mode="json") for span in trace.spans],
    }
    check_no_gold(row, trace.expected)
    return row


def simulate(task: str, traces: Iterable[Any], system: Any) -> tuple[list[dict[str, Any]], int]:
    """The feedback rows of scored traces, and how many traces gave no row."""
    rows, skipped = [], 0
    for trace in traces:
        row = feedback_row(task, trace, system)
        if row is None:
            skipped += 1
        else:
            rows.append(row)
    return rows, skipped


def write_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """The feedback file, written as ``benchmarks/data.py`` writes its splits (atomically)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from data import write_jsonl
    finally:
        sys.path.pop(0)
    write_jsonl(path, rows)


def simulate_from_job(task: str, job: Any, out: Path) -> tuple[int, int]:
    """Run the untrained system once on ``job``'s train split (scored by its gold metric),
    write the feedback file ``out``; return (rows, runs without output)."""
    from cotune.data import load_examples

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from quality import base_traces
    finally:
        sys.path.pop(0)
    train = job.data_path("train")
    if train is None:
        raise SystemExit("the job has no train split to simulate feedback on")
    traces, _ = base_traces(job, load_examples(train, job.system, split="train"))
    rows, skipped = simulate(task, traces, job.system)
    write_rows(out, rows)
    return len(rows), skipped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, help="the comment rules: object-count or other")
    parser.add_argument("--job", type=Path, help="a gold-scored job: its base system, train split")
    parser.add_argument("--traces", type=Path, help="traces of a base run, with expected")
    parser.add_argument("--system", type=Path, help="the system of --traces (default: --job's)")
    parser.add_argument("--out", type=Path, required=True, help="the feedback JSONL to write")
    args = parser.parse_args(argv)
    from cotune.spec import load_system
    from cotune.spec.job import load_job

    if args.traces is not None:
        from cotune.runtime import Trace
        from cotune.scoring import GoldScorer

        if args.system is None and args.job is None:
            parser.error("--traces needs --system or --job")
        system = load_system(args.system) if args.system else load_job(args.job).system
        traces = [
            Trace.model_validate_json(line)
            for line in args.traces.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        GoldScorer(system).score(traces)  # the gold comparison, whatever the run recorded
        rows, skipped = simulate(args.task, traces, system)
        write_rows(args.out, rows)
        made = len(rows)
    elif args.job is not None:
        made, skipped = simulate_from_job(args.task, load_job(args.job), args.out)
    else:
        parser.error("give --job or --traces")
    print(f"{made} rated runs written to {args.out} ({skipped} runs without output skipped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
