"""What a quality run's traces say, checked against gold: why a variant gained or lost.

Reads one task's variant folders of a ``benchmarks/quality.py`` run (``<out>/runs-quick/<task>``
or ``<out>/runs/<task>``: each variant's stored stage outputs and the run's gold splits under
``data/``) and prints three tables:

1. **The loop's scorer against gold** (variants whose loop scored by ``metric: judge``): on each
   set of traces the judge scored (the base system on val, the rollout, the trained system on
   val and on test), how often its pass agreed with the gold metric's. A rated run's pass is
   the (simulated) person's rating, not the judge's.
2. **Verification against gold**: every single-span candidate of the verify stages, accepted or
   refused, by whether its replayed output is right against gold.
3. **Test outputs**: right answers, and where the gold answers are whole numbers, how the wrong
   ones err (too low, too high, mean absolute error); the first component's spans cut at their
   ``max_tokens``.

    python benchmarks/traces_vs_gold.py benchmarks/results/runs-quick/object-count
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CELLS = ("pass, right", "pass, wrong", "fail, right", "fail, wrong")
VERIFIED = ("accepted, right", "accepted, wrong", "refused, right", "refused, wrong")
TESTED = ("right", "too low", "too high", "mean abs error", "first component cut at max_tokens")


def read_gold(task_dir: Path) -> dict[str, list[str]]:
    """Example id -> gold answers over the run's train, val and test subsets."""
    gold: dict[str, list[str]] = {}
    for split in ("train", "val", "test"):
        path = task_dir / "data" / f"{split}.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
            row = json.loads(line)
            expected = row.get("expected")
            if expected is not None:
                gold[str(row["id"])] = expected if isinstance(expected, list) else [expected]
    return gold


class Variant:
    """One variant's folder: its job (``variant.json``) and its stored stage outputs."""

    def __init__(self, folder: Path) -> None:
        self.name = folder.name
        self.job: dict[str, Any] = json.loads((folder / "variant.json").read_text())["job"]
        jobs = sorted((folder / "artifacts").glob("job-*"))  # none: the base variant
        self.root = jobs[0] if jobs else None

    @property
    def judged(self) -> bool:
        return self.job["system"].get("metric") == "judge"

    def outputs(self, stage: str) -> list[tuple[int, Any]]:
        """(epoch, output) of every stored output of ``stage``, typed, epoch order."""
        from cotune.records import Stage, stage_output_model

        model = stage_output_model(Stage(stage))
        if self.root is None:
            return []
        found = []
        for path in self.root.glob(f"epoch-*/{stage}.json"):
            epoch = int(path.parent.name.removeprefix("epoch-"))
            found.append((epoch, model.model_validate_json(path.read_text(encoding="utf-8"))))
        return sorted(found, key=lambda pair: pair[0])


class Gold:
    def __init__(self, gold: dict[str, list[str]], metric: str, threshold: float) -> None:
        self.gold, self.metric, self.threshold = gold, metric, threshold

    def right(self, example_id: str, output: Any) -> bool | None:
        from cotune.metrics import score

        answers = self.gold.get(str(example_id))
        if not answers:
            return None
        return score(self.metric, output, answers) >= self.threshold


def scorer_rows(variant: Variant, gold: Gold) -> list[list[str]]:
    from cotune.scoring import judge_agreement

    sets: list[tuple[str, list[Any]]] = []
    sets += [("base on val", out.traces) for _, out in variant.outputs("baseline")]
    for epoch, out in variant.outputs("rollout"):
        rated = out.traces[len(out.traces) - out.feedback :] if out.feedback else []
        runs = out.traces[: len(out.traces) - out.feedback]
        if runs:
            sets.append((f"epoch {epoch} rollout", runs))
        if rated:
            sets.append((f"epoch {epoch} rated runs (the rating)", rated))
    sets += [(f"epoch {e} trained on val", out.traces) for e, out in variant.outputs("evaluate")]
    sets += [("kept system on test", out.traces) for _, out in variant.outputs("test")]
    rows = []
    for what, traces in sets:
        counts = judge_agreement(traces, gold.gold, metric=gold.metric, threshold=gold.threshold)
        cells = [counts.pass_right, counts.pass_wrong, counts.fail_right, counts.fail_wrong]
        precision = "-" if counts.precision is None else f"{counts.precision:.2f}"
        rows.append([variant.name, what, *map(str, cells), str(counts.unscored), precision])
    return rows


def verification_row(variant: Variant, gold: Gold) -> list[str] | None:
    cells = dict.fromkeys(VERIFIED, 0)
    found = False
    for _, out in variant.outputs("verify"):
        for index, candidate in enumerate(out.candidates):
            replay = out.replays.get(index)
            if candidate.kind != "single" or replay is None:
                continue
            right = gold.right(replay.example_id, replay.output)
            if right is None:
                continue
            found = True
            taken = "accepted" if candidate.accepted else "refused"
            cells[f"{taken}, {'right' if right else 'wrong'}"] += 1
    return [variant.name, *map(str, cells.values())] if found else None


def tested_row(variant: Variant, folder: Path, gold: Gold) -> list[str] | None:
    from cotune.runtime import Trace

    path = folder / "traces" / "test.jsonl"
    if not path.exists():
        return None
    traces = [Trace.model_validate_json(line) for line in path.read_text().splitlines() if line]
    right = sum(bool(gold.right(t.example_id, t.output)) for t in traces)
    errors = []
    for trace in traces:
        answers = gold.gold.get(str(trace.example_id), [])
        output = str(trace.output or "").strip()
        if answers and re.fullmatch(r"\d+", str(answers[0])) and re.fullmatch(r"\d+", output):
            errors.append(int(output) - int(answers[0]))
    numeric = [str(sum(e < 0 for e in errors)), str(sum(e > 0 for e in errors))]
    mae = f"{statistics.mean(abs(e) for e in errors):.2f}" if errors else "-"
    first = [t.spans[0] for t in traces if t.spans and t.spans[0].sampling]
    cut = sum(s.completion_tokens >= int((s.sampling or {})["max_tokens"]) for s in first)
    return [variant.name, f"{right}/{len(traces)}", *numeric, mae, f"{cut}/{len(first)}"]


def table(header: Sequence[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def report(task_dir: Path, names: Sequence[str] | None = None) -> str:
    folders = [f for f in sorted(task_dir.iterdir()) if (f / "variant.json").exists()]
    folders = [f for f in folders if names is None or f.name in names]
    variants = [(f, Variant(f)) for f in folders]
    gold_system = next((v.job["system"] for _, v in variants if not v.judged), None)
    metric = (gold_system or {}).get("metric", "exact_match")
    threshold = float((gold_system or {}).get("pass_threshold") or 1.0)
    gold = Gold(read_gold(task_dir), metric, threshold)
    scorer = [row for _, v in variants if v.judged for row in scorer_rows(v, gold)]
    verified = [row for _, v in variants if (row := verification_row(v, gold))]
    tested = [row for f, v in variants if (row := tested_row(v, f, gold))]
    parts = [
        f"Traces of `{task_dir}` against gold ({metric}, right at >= {threshold:g}).",
        "",
        "The loop's scorer against gold (judge-scored loops; pass = the loop's, right = gold's):",
        "",
        table(["variant", "traces", *CELLS, "unscored", "precision of pass"], scorer)
        if scorer
        else "(no variant's loop was judge-scored)",
        "",
        "Verification against gold (single-span candidates; right = the replayed output):",
        "",
        table(["variant", *VERIFIED], verified),
        "",
        "Test outputs of the kept system (numbers: where gold and output are whole numbers):",
        "",
        table(["variant", *TESTED], tested),
    ]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task_dir", type=Path, help="<out>/runs-quick/<task> of a quality run")
    parser.add_argument("--variants", help="comma list (default: every variant run)")
    args = parser.parse_args(argv)
    names = args.variants.split(",") if args.variants else None
    print(report(args.task_dir, names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
