"""The quality benchmark's variants whose loop never sees gold (issue 14 part 4).

Both run on the same examples and seeds as ``full`` (the gold path), with the system's metric
set to ``judge`` under a rubric the task states (``RUBRICS``, no gold value in it) and every
split the job reads stripped to its ids and input fields (``no-gold/`` beside the run's split
copies):

============= ===================================================================================
judge-scored  the job's train, val and test without ``expected``: the judge scores rollouts,
              replays, val and test under the rubric
feedback      simulated human feedback: ``benchmarks/simulate_feedback.py`` runs the base system
              once on the train inputs and rates each run against its gold (up/down and a
              coarse comment, never the gold value); the job has ``data.feedback`` (that file)
              and no train split; val and test without ``expected``
============= ===================================================================================

The final test is still scored by the task's gold metric: the benchmark re-scores a variant's
test traces against the gold rows (``gold_answers``), so its per-item scores pair with base and
full. Scoring by the judge spends judge calls the gold path does not, so these variants get
``JUDGE_BUDGET_FACTOR`` times the task job's ``budget.max_judge_calls``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

VARIANTS: dict[str, str] = {
    "judge-scored": "full with gold hidden from the loop: the judge scores under the task's rubric",
    "feedback": "simulated human ratings and comments on base runs (no train split, no gold)",
}
# What a good final output is, per task, stated without any gold value.
RUBRICS: dict[str, str] = {
    "object-count": (
        "The answer is the number of things of the kind the question asks about that the "
        "sentence lists (a quantity word such as 'two violins' counts as that many; things of "
        "other kinds do not count), written as digits only."
    ),
    "squad-rag": (
        "The answer is the short span of a retrieved passage that answers the question (a "
        "name, a number, a date or a few words), with no explanation and nothing invented."
    ),
    "colored-objects": (
        "The answer is one word that correctly answers the question about the objects the scene "
        "lists (a colour, yes or no, or a number written as a digit or a word), with nothing else."
    ),
    "tiny-kb": "names the colour of the thing the question asks about, and nothing else",
}
JUDGE_BUDGET_FACTOR = 3
NO_GOLD = "no-gold"  # the folder of the stripped splits, beside the run's split copies


def rubric(task: str, system: dict[str, Any]) -> str:
    """The task's rubric; a task without one is judged by what its system says it does."""
    if task in RUBRICS:
        return RUBRICS[task]
    description = " ".join(str(system.get("description") or system["name"]).split())
    return f"The output does the system's task correctly: {description}"


def variant_job(task: str, job: dict[str, Any], variant: str) -> dict[str, Any]:
    """The gold-hidden variant's job mapping, from (a copy of) the gold path's ``job``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown gold-hidden variant {variant!r}; known: {list(VARIANTS)}")
    system = job["system"]
    system.pop("pass_threshold", None)  # the judge's default threshold applies
    system["metric"], system["rubric"] = "judge", rubric(task, system)
    data = job["data"]
    folder = Path(data["val"]).parent
    splits = ("val", "test") if variant == "feedback" else ("train", "val", "test")
    hidden = {s: str(folder / NO_GOLD / Path(data[s]).name) for s in splits if data.get(s)}
    if variant == "feedback":
        hidden = {"feedback": str(folder / "feedback.jsonl"), **hidden}
    job["data"] = hidden
    budget = job.setdefault("budget", {})
    calls = budget.get("max_judge_calls", 1000)
    if calls is not None:
        budget["max_judge_calls"] = int(calls) * JUDGE_BUDGET_FACTOR
    return job


def strip_gold(source: Path, target: Path, inputs: list[str]) -> Path:
    """``source``'s rows with only their ``id`` and the system's input fields."""
    rows = []
    for line in source.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append({k: row[k] for k in ("id", *inputs) if k in row})
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.read_text(encoding="utf-8") != text:
        target.write_text(text, encoding="utf-8")
    return target


def prepare(
    task: str, variant: str, gold_job: dict[str, Any], job: dict[str, Any], base_dir: Path
) -> None:
    """Write what ``job`` (the variant's mapping) reads: the stripped splits, and for
    ``feedback`` the simulated feedback on the gold path's train split (made once per train
    split and system; remade when either changes)."""
    inputs = list(gold_job["system"]["inputs"])
    for split, path in job["data"].items():
        if split != "feedback":
            strip_gold(Path(gold_job["data"][split]), Path(path), inputs)
    if variant != "feedback":
        return
    import sys

    from cotune.spec.job import parse_job

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from simulate_feedback import simulate_from_job
    finally:
        sys.path.pop(0)
    out = Path(job["data"]["feedback"])
    train = Path(gold_job["data"]["train"])
    source = hashlib.sha256(
        train.read_bytes() + json.dumps(gold_job["system"], sort_keys=True).encode()
    ).hexdigest()
    marker = out.with_name(out.name + ".source")
    if out.exists() and marker.exists() and marker.read_text().strip() == source:
        return
    rows, skipped = simulate_from_job(task, parse_job(gold_job, base_dir=base_dir), out)
    marker.write_text(source + "\n")
    print(f"{task}: simulated feedback on {rows} base runs ({skipped} without output)")


def gold_answers(test_file: Path, system: dict[str, Any]) -> dict[str, list[str]]:
    """Each gold test row's accepted answers, by example id."""
    from cotune.data import load_examples
    from cotune.spec import parse_system

    examples = load_examples(test_file, parse_system(system), split="test")
    return {e.id: list(e.expected or []) for e in examples}


def share_of_gain(variant_vs_base: dict[str, Any], full_vs_base: dict[str, Any]) -> str:
    """(variant - base) / (full - base) where full's gain interval excludes 0."""
    if not full_vs_base or not variant_vs_base:
        return "-"
    if full_vs_base["low"] <= 0.0:
        return "gold path shows no gain"
    return f"{variant_vs_base['diff'] / full_vs_base['diff']:.0%}"
