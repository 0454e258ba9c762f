"""Quality benchmark: does co-tuning beat bootstrapping, and which of its parts matter?

For each task, with SmolLM2-135M-Instruct for every component (and, on a CPU, as the judge),
it runs these variants on the same fixed splits and compares their test scores item by item:

============== ==================================================================================
variant        what it is (the JobSpec settings that make it; the rest as the task's job.yaml)
============== ==================================================================================
base           the untrained system, evaluated once on test
bootstrap      DSPy BootstrapFinetune's method: SFT on the spans of passing traces only (rollouts
               and sampled augmentation rollouts); ``judge: null``, ``resample_candidates: 0``,
               ``gold_candidates: false`` (where the loop has it), ``method: sft``; same epochs,
               batch and sample budget as full
full           cotune: judge + replay-verified corrections (re-sampling where the judge proposes
               nothing; graded verification with a binary metric) + synthesis, SFT then DPO:
               the task's job.yaml
no-verify      full with ``loop.verify_by_replay: false``: every proposal is accepted, whatever
               replaying it showed (the replays still run and are recorded)
binary-verify  full with ``loop.graded_verification: false``: only corrections that raise the
               task score are accepted, not those that move the output closer to gold
no-judge       ``judge: null``, ``gold_candidates: false``: candidates come only from re-sampling,
               still verified by replay
sft-only       full with ``method: sft`` (no DPO)
oracle         an upper reference no real job has: each trainable component SFT-trained on its
               ideal outputs (``train.rows: targets``: every train row's ``targets``, teacher-
               forced, the final writer's being the gold answer) on the same train rows with the
               same training settings (``method: sft``); ``judge: null``, no candidates, one loop
               epoch (the rows are the same every epoch and SFT restarts from the base) and
               ``keep: last`` (its score is the trained system's, even below base)
judge-scored   full with gold hidden from the loop: ``metric: judge`` under the task's rubric,
               no ``expected`` in any split the job reads (``benchmarks/gold_hidden.py``)
feedback       simulated human feedback (``benchmarks/simulate_feedback.py``): ratings and coarse
               comments on base runs of the train inputs as ``data.feedback``, no train split,
               ``metric: judge``, no gold in val or test
============== ==================================================================================

Ideal targets per task (``benchmarks/data.py`` writes them): colored-objects (the chain task), the
extractor's numbered list of the scene's objects and the writer's gold answer; tracking-three (a
rejected candidate), the tracker's "name: thing" holdings after simulating the stated swaps and
the writer's gold answer; object-count, the
extractor's "<count> <kind>" (BIG-bench names no items: the gold count itself, which the tool passes
through); squad-rag, the answer writer's gold span given the gold paragraph as its passages, and no
target for the query writer (the data names no ideal query; it stays the base model); tiny-kb, the
ideal query and passage of the tiny world.

judge-scored and feedback are tested against gold all the same: their test traces are
re-scored by the task's metric against the gold test rows, so they pair with base and full;
the report gives their intervals against base and against full and the share of the gold
path's gain each keeps.

Each variant runs in-process (``cotune.embedded.run_embedded``) into
``<out>/runs/<task>/<variant>/`` and is skipped when its ``metrics.json`` exists (the spec it
ran is kept beside it as ``variant.json`` and must match); an interrupted variant resumes from
its last finished stage. The report compares the variants on the test items they share: paired
bootstrap 95 % intervals of the score difference against base and against bootstrap, and
McNemar's exact test on exact match; plus wall time, engine calls, judge calls and trained
tokens. It writes ``<out>/quality.md`` and one plot per task, ``<out>/quality-<task>.png``.
A run of some tasks rewrites only their sections of ``quality.md`` and keeps the others as they
were (each section says when and by which command it was made).

    python benchmarks/data.py                       # once: fetch the data, build the splits
    python benchmarks/quality.py                    # every task, every variant (hours on CPU)
    python benchmarks/quality.py --quick            # 36 train / 20 val / 60 test, one epoch
                                                    # (colored-objects: 100 / 50 / 60, its
                                                    # job's training: FULL_TRAINING)
    python benchmarks/quality.py --tasks object-count --variants base,bootstrap,full
    python benchmarks/quality.py --tiny --model-path DIR --train 8 --val 6 --test 8  # tests

``--quick`` and ``--tiny`` write ``runs-quick/`` + ``quality-quick.md`` and
``quality-quick-<task>.png`` (``-tiny``) instead, so they never mix with the full run's results.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gold_hidden
import machine

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASKS = ("squad-rag", "object-count", "colored-objects")
# The chain task's rejected candidates: --tasks takes them too (results/chain-selection.md).
CANDIDATES = ROOT / "benchmarks" / "candidates"
VARIANTS: dict[str, str] = {
    "base": "the untrained system",
    "bootstrap": "SFT on spans of passing traces only (BootstrapFinetune), same budget",
    "full": "judge + replay-verified corrections + synthesis, SFT then DPO",
    "no-verify": "full, proposals accepted without replay verification",
    "binary-verify": "full, verified by the task metric only (no graded verification)",
    "no-joint": "full with single-span candidates only (no joint candidates, no downstream first)",
    "no-judge": "no judge: re-sampled candidates only, verified by replay",
    "sft-only": "full without DPO",
    "oracle": "SFT on each component's ideal targets, same rows and settings (upper reference)",
    **gold_hidden.VARIANTS,  # judge-scored, feedback: the loop never sees gold
}
# Per-item metrics reported for each task (McNemar's test goes with exact_match).
TASK_METRICS: dict[str, list[str]] = {
    "squad-rag": ["exact_match", "f1"],
    "object-count": ["exact_match"],
    "tracking-three": ["exact_match"],
    "colored-objects": ["exact_match"],
    "tiny-kb": ["exact_match"],
}
QUICK = {"train": 36, "val": 20, "test": 60, "epochs": 1}  # and one training epoch
# Tasks that --quick runs with their job's own training (every train row, the job's training
# epochs) and this many val rows: the chain task, whose oracle qualified only so (revision 1
# of the rule in benchmarks/results/chain-selection.md). Test and loop epochs stay quick's.
FULL_TRAINING = {"colored-objects": 50}
# The tiny task's job (as in tests/core/test_loop.py): the tiny model is its own judge.
TINY_JOB: dict[str, Any] = {
    "judge": {"model": "tiny", "max_tokens": 256},
    "loop": {"epochs": 1, "rollout_batch": 32, "samples_per_component": 48, "judge_samples": 1},
    "train": {"epochs": 2, "batch_size": 8, "learning_rate": 2.0e-3, "lora_r": 8, "lora_alpha": 16},
}
BOOTSTRAP_SAMPLES = 10_000


# -- tasks and variants -----------------------------------------------------------------------


@dataclass
class Task:
    name: str
    folder: Path  # the system's folder: its relative corpus paths resolve here
    job: dict[str, Any]  # the full-cotune job mapping, system inline, data paths absolute
    metrics: list[str]


def load_task(name: str, args: argparse.Namespace, runs: Path) -> Task:
    """The task's full-cotune job, on this run's (possibly smaller) copies of the splits."""
    from cotune.spec import read_mapping

    if name == "tiny-kb":
        from cotune.models import prepare_model
        from cotune.tiny import write_tiny_example

        model = args.model_path or prepare_model("tiny", progress=None)
        folder = write_tiny_example(runs / "tiny-kb" / "example", model_path=str(model))
        add_tiny_targets(folder)
        job = {"system": read_mapping(folder / "system.yaml"), **json.loads(json.dumps(TINY_JOB))}
        sources = {s: folder / f"{s}.jsonl" for s in ("train", "val", "test")}
    else:
        folder = ROOT / "examples" / name
        if name not in TASKS:  # a rejected chain candidate (benchmarks/results/chain-selection.md)
            folder = CANDIDATES / name
        job = read_mapping(folder / "job.yaml")
        job["system"] = read_mapping(folder / str(job["system"]))
        sources = {s: (folder / str(p)).resolve() for s, p in job["data"].items()}
        if not all(p.exists() for p in sources.values()):
            sys.path.insert(0, str(ROOT / "benchmarks"))
            try:
                import data as benchmark_data
            finally:
                sys.path.pop(0)
            print("benchmark data missing: running benchmarks/data.py", file=sys.stderr)
            benchmark_data.ensure()
        if args.model_path:
            job["system"]["models"] = {
                alias: {"path": str(Path(args.model_path).resolve())}
                for alias in job["system"]["models"]
            }
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    full_training = args.quick and name in FULL_TRAINING
    if full_training:
        sizes.update(train=None, val=FULL_TRAINING[name])
    job["data"] = {
        split: str(_subset(path, runs / name / "data" / f"{split}.jsonl", sizes[split]))
        for split, path in sources.items()
    }
    loop, train = job.setdefault("loop", {}), job.setdefault("train", {})
    if args.epochs is not None:
        loop["epochs"] = args.epochs
    if args.quick and not full_training:
        train["epochs"] = 1
    if sizes["train"] is not None:
        loop["rollout_batch"] = min(int(loop.get("rollout_batch", 36)), sizes["train"])
        loop["samples_per_component"] = min(
            int(loop.get("samples_per_component", 100)), sizes["train"]
        )
    return Task(name=name, folder=folder, job=job, metrics=TASK_METRICS.get(name, ["exact_match"]))


def add_tiny_targets(folder: Path) -> None:
    """The tiny-kb task's ideal targets, added to its rows: the query the tiny world names for
    the question's key, and that key's fact as the one retrieved passage (the oracle's only)."""
    from cotune.tiny import make_world

    world = make_world()  # write_tiny_example's world (its default seed)
    key_of = {world.question(key): key for key in world.facts}
    fact_of = dict(zip(world.facts, (row["text"] for row in world.corpus), strict=True))
    for split in ("train", "val", "test"):
        path = folder / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        for row in rows:
            key = key_of[row["question"]]
            row["targets"] = {"query": world.query(key), "passages": [fact_of[key]]}
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _subset(source: Path, target: Path, limit: int | None) -> Path:
    """The first ``limit`` rows of a split (the splits are already shuffled with a seed)."""
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    text = "".join(line + "\n" for line in lines[:limit])
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.read_text(encoding="utf-8") != text:
        target.write_text(text, encoding="utf-8")
    return target.resolve()


def variant_job(task: Task, variant: str) -> dict[str, Any]:
    """The job mapping of one variant: the full job with that variant's settings changed."""
    job = json.loads(json.dumps(task.job))
    loop, train = job.setdefault("loop", {}), job.setdefault("train", {})
    if variant == "bootstrap":
        job["judge"] = None
        loop["resample_candidates"] = 0
        _no_gold_candidates(loop)
        train["method"] = "sft"
    elif variant == "no-judge":
        job["judge"] = None
        loop["resample_candidates"] = max(int(loop.get("resample_candidates", 2)), 1)
        _no_gold_candidates(loop)
    elif variant == "sft-only":
        train["method"] = "sft"
    elif variant == "no-verify":
        loop["verify_by_replay"] = False
    elif variant == "binary-verify":
        loop["graded_verification"] = False
    elif variant == "no-joint":
        loop["joint_candidates"] = False
    elif variant == "oracle":
        job["judge"] = None
        loop.update(epochs=1, keep="last", resample_candidates=0, augment_rollouts=0)
        _no_gold_candidates(loop)
        train.update(method="sft", rows="targets")
    elif variant in gold_hidden.VARIANTS:
        job = gold_hidden.variant_job(task.name, job, variant)
    elif variant not in ("base", "full"):
        raise ValueError(f"unknown variant {variant!r}; known: {list(VARIANTS)}")
    return job


def _no_gold_candidates(loop: dict[str, Any]) -> None:
    """Bootstrap and no-judge take no gold-answer candidates, where the loop has them."""
    from cotune.spec.job import LoopConfig

    if "gold_candidates" in LoopConfig.model_fields:
        loop["gold_candidates"] = False


def start_engines(tasks: Sequence[Task]) -> None:
    """Start each base model's vLLM engine once, with LoRA limits that fit every task: the
    process caches one engine per model and its limits are fixed when it starts, so a first
    task with one trainable component would otherwise leave no room for a later one's two."""
    from cotune.engines import get_engine
    from cotune.models import resolve_model
    from cotune.spec.job import parse_job

    jobs = [parse_job(variant_job(task, "full"), base_dir=task.folder) for task in tasks]
    limits = {
        "max_lora_rank": max(max(job.train.lora_r, 16) for job in jobs),
        "max_loras": max(max(len(job.system.trainable_components), 1) for job in jobs),
    }
    for job in jobs:
        if job.engine != "vllm":
            continue
        for ref in job.system.models.values():
            get_engine("vllm", resolve_model(ref, job.system.base_dir), **limits)


# -- running ----------------------------------------------------------------------------------


def run_variant(task: Task, variant: str, out: Path, *, progress: bool) -> str:
    """Run one variant into ``out`` unless it finished before; return what happened."""
    from cotune.spec.job import parse_job

    job_map = variant_job(task, variant)
    spec = {"variant": variant, "job": job_map, "data_sha256": _data_hashes(job_map)}
    marker = out / "variant.json"
    if marker.exists() and json.loads(marker.read_text()) != spec:
        raise SystemExit(
            f"{out} holds a {variant} run made with other settings or data; delete that folder "
            "(or choose another --out) to run it again"
        )
    if (out / "metrics.json").exists():
        return "cached"
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(spec, indent=2) + "\n")
    job = parse_job(job_map, base_dir=task.folder)
    started = time.perf_counter()
    try:
        if variant == "base":
            evaluate_base(job, out)
            what = "ran"
        else:
            resume = (out / "job.json").exists()
            _run_embedded(job, out, resume=resume, progress=progress)
            what = "resumed" if resume else "ran"
    finally:
        _add_wall(out, time.perf_counter() - started)
    return what


def _run_embedded(job: Any, out: Path, *, resume: bool, progress: bool) -> Any:
    from cotune.embedded import run_embedded

    return run_embedded(job, out, resume=resume, progress=progress)


def _data_hashes(job_map: dict[str, Any]) -> dict[str, str]:
    return {
        split: hashlib.sha256(Path(path).read_bytes()).hexdigest()
        for split, path in job_map["data"].items()
        if path
    }


def _add_wall(out: Path, seconds: float) -> None:
    """Wall time summed over every attempt at a variant (a resumed one has several)."""
    path = out / "wall.json"
    previous = json.loads(path.read_text()) if path.exists() else {"seconds": 0.0, "attempts": 0}
    total = {
        "seconds": round(previous["seconds"] + seconds, 2),
        "attempts": previous["attempts"] + 1,
    }
    path.write_text(json.dumps(total) + "\n")


def evaluate_base(job: Any, out: Path) -> Any:
    """The untrained system on test, written like a finished job: metrics.json (a JobReport
    whose one stage is the test evaluation) and traces/test.jsonl."""
    from cotune.data import load_examples
    from cotune.records import JobReport, Stage, StageRecord
    from cotune.runtime import mean_score

    test = job.data_path("test")
    if test is None:
        raise SystemExit("the job has no test split")
    started = time.perf_counter()
    traces, spent = base_traces(job, load_examples(test, job.system, split="test"))
    score = mean_score(traces)
    record = StageRecord(
        epoch=0,
        stage=Stage.test,
        seconds=round(time.perf_counter() - started, 3),
        engine_calls=spent["calls"],
        prompt_tokens=spent["prompt_tokens"],
        completion_tokens=spent["completion_tokens"],
    )
    report = JobReport(
        job_name=job.system.name,
        status="succeeded",
        base_test_score=score,
        test_score=score,
        stages=[record],
    )
    (out / "traces").mkdir(parents=True, exist_ok=True)
    with open(out / "traces" / "test.jsonl", "w", encoding="utf-8") as handle:
        for trace in traces:
            handle.write(trace.model_dump_json() + "\n")
    (out / "metrics.json").write_text(report.model_dump_json(indent=2) + "\n")
    return report


def base_traces(job: Any, examples: list[Any]) -> tuple[list[Any], dict[str, int]]:
    """The untrained system's traces of ``examples``, scored by the task metric against their
    gold, and the engine calls and tokens they took (base on test; simulate_feedback.py on
    train)."""
    from cotune.runtime import open_runtime, score_traces

    options: dict[str, Any] = {}
    if job.engine == "vllm":  # the engine is shared with the trained variants: same limits
        options = {
            "max_lora_rank": max(job.train.lora_r, 16),
            "max_loras": max(len(job.system.trainable_components), 1),
        }
    runtime = open_runtime(job.system, engine=job.engine, engine_options=options)
    before = _counters(runtime)
    traces = []
    for start in range(0, len(examples), 64):
        chunk = runtime.run(examples[start : start + 64])
        score_traces(job.system, chunk)
        traces.extend(chunk)
    after = _counters(runtime)
    return traces, {key: after[key] - before[key] for key in after}


def _counters(runtime: Any) -> dict[str, int]:
    engines = {id(e): e for e in runtime.engines.values()}
    return {
        key: sum(getattr(e.stats, key) for e in engines.values())
        for key in ("calls", "prompt_tokens", "completion_tokens")
    }


# -- statistics -------------------------------------------------------------------------------


def item_scores(
    trace_file: Path, metrics: Sequence[str], gold: dict[str, list[str]] | None = None
) -> dict[str, dict[str, float]]:
    """Per test example id, each metric's score of the system's output against the gold: the
    trace's own ``expected``, or ``gold`` (example id -> answers) where given (the test traces
    of a variant whose job held no gold are re-scored against the benchmark's gold rows)."""
    from cotune.metrics import score

    scores: dict[str, dict[str, float]] = {}
    for line in trace_file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        trace = json.loads(line)
        expected = (trace.get("expected") or []) if gold is None else gold[str(trace["example_id"])]
        scores[str(trace["example_id"])] = {
            m: score(m, trace.get("output"), expected) if expected else 0.0 for m in metrics
        }
    return scores


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``b - a`` over paired items and its 95 % percentile bootstrap interval
    (items resampled with replacement, the pairs kept together)."""
    import numpy as np

    if len(a) != len(b) or not a:
        raise ValueError("paired_bootstrap needs two equally long, non-empty score lists")
    diffs = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(samples, len(diffs)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diffs.mean()), float(low), float(high)


def bootstrap_interval(
    values: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile bootstrap interval of a mean (the plot's error bars)."""
    import numpy as np

    array = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, len(array), size=(samples, len(array)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, float]:
    """McNemar's exact test on paired pass/fail outcomes: ``(only a passed, only b passed,
    two-sided p)``, the binomial test of the discordant pairs against 1/2."""
    if len(a) != len(b):
        raise ValueError("mcnemar_exact needs paired outcomes")
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = only_a + only_b
    if n == 0:
        return only_a, only_b, 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return only_a, only_b, min(1.0, 2 * tail)


@dataclass
class VariantResult:
    variant: str
    scores: dict[str, dict[str, float]]  # example id -> metric -> score
    report: Any  # JobReport
    wall_seconds: float | None


def load_result(
    folder: Path, variant: str, metrics: Sequence[str], gold: dict[str, list[str]] | None = None
) -> VariantResult | None:
    from cotune.records import JobReport

    metrics_file, traces = folder / "metrics.json", folder / "traces" / "test.jsonl"
    if not metrics_file.exists() or not traces.exists():
        return None
    wall = folder / "wall.json"
    return VariantResult(
        variant=variant,
        scores=item_scores(traces, metrics, gold),
        report=JobReport.model_validate_json(metrics_file.read_text()),
        wall_seconds=json.loads(wall.read_text())["seconds"] if wall.exists() else None,
    )


def compare(
    a: VariantResult, b: VariantResult, metrics: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """``b`` against ``a`` on the test items both have, per metric."""
    shared = sorted(set(a.scores) & set(b.scores))
    out: dict[str, dict[str, Any]] = {}
    if not shared:
        return out
    for metric in metrics:
        xs = [a.scores[i][metric] for i in shared]
        ys = [b.scores[i][metric] for i in shared]
        diff, low, high = paired_bootstrap(xs, ys)
        row: dict[str, Any] = {"n": len(shared), "diff": diff, "low": low, "high": high}
        if all(v in (0.0, 1.0) for v in xs + ys):
            only_a, only_b, p = mcnemar_exact([x == 1.0 for x in xs], [y == 1.0 for y in ys])
            row.update(only_a=only_a, only_b=only_b, p=p)
        out[metric] = row
    return out


# -- the report -------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _delta(row: dict[str, Any] | None) -> str:
    if not row:
        return "-"
    return f"{row['diff']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]"


def _p(row: dict[str, Any] | None) -> str:
    if not row or "p" not in row:
        return "-"
    return f"{row['p']:.3g} ({row['only_a']}/{row['only_b']})"


def describe_judge(job: dict[str, Any]) -> str:
    judge, models = job.get("judge"), job["system"].get("models", {})
    if not judge:
        return "no judge"
    ref = models.get(judge["model"])
    if ref is not None:
        what = ref.get("name") or Path(str(ref.get("path"))).name
        return (
            f"`{judge['model']}` = the components' own model ({what}), JSON-schema decoding, "
            f"{job.get('loop', {}).get('judge_samples', 3)} sample(s) per failed trace"
        )
    return f"`{judge['model']}` ({judge.get('engine') or 'registry model'})"


def task_section(
    task: Task, results: dict[str, VariantResult], *, produced: str, plot_name: str
) -> list[str]:
    metrics = task.metrics
    primary = task.job["system"].get("metric", "exact_match")
    base, boot = results.get("base"), results.get("bootstrap")
    n = len(next(iter(results.values())).scores) if results else 0
    loop, train = task.job.get("loop", {}), task.job.get("train", {})
    sizes = {
        split: len(Path(path).read_text(encoding="utf-8").splitlines())
        for split, path in task.job["data"].items()
    }
    lines = [
        f"## {task.name}",
        "",
        produced,
        "",
        f"System metric `{primary}` (pass threshold "
        f"{task.job['system'].get('pass_threshold', 1.0)}); splits train {sizes.get('train')}, "
        f"val {sizes.get('val')}, test {sizes.get('test')}; loop {json.dumps(loop)}; "
        f"train {json.dumps(train)}.",
        f"Judge (full, no-verify, sft-only): {describe_judge(task.job)}.",
        "",
        f"### Test scores (n = {n}); Δ = variant − reference, paired bootstrap 95 % CI; "
        "McNemar exact p (items only the reference / only the variant got right)",
        "",
    ]
    header = ["variant"]
    for m in metrics:
        header += [m, f"Δ {m} vs base", f"Δ {m} vs bootstrap"]
        if m == "exact_match":
            header += ["McNemar p vs base", "McNemar p vs bootstrap"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for variant, result in results.items():
        cells = [variant]
        vs_base = compare(base, result, metrics) if base and variant != "base" else {}
        vs_boot = (
            compare(boot, result, metrics) if boot and variant not in ("base", "bootstrap") else {}
        )
        for m in metrics:
            cells += [
                f"{_mean([s[m] for s in result.scores.values()]):.3f}",
                _delta(vs_base.get(m)),
                _delta(vs_boot.get(m)),
            ]
            if m == "exact_match":
                cells += [_p(vs_base.get(m)), _p(vs_boot.get(m))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Cost (whole variant: base val, every epoch, and the test evaluation of the base "
        "and the best epoch; wall time includes loading the engine when the variant was the "
        "first to run in its process)",
        "",
        "| variant | what | best epoch | val base → best | wall time (s) | engine calls | "
        "generated tokens | judge calls | trained tokens |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, result in results.items():
        report, totals = result.report, result.report.totals()
        val = (
            "-"
            if report.base_val_score is None
            else f"{report.base_val_score:.3f} → {report.best_val_score:.3f}"
        )
        wall = "-" if result.wall_seconds is None else f"{result.wall_seconds:.0f}"
        best = "-" if variant == "base" else (report.best_epoch or "none kept")
        lines.append(
            f"| {variant} | {VARIANTS.get(variant, '')} | {best} | {val} | {wall} | "
            f"{int(totals['engine_calls'])} | {int(totals['completion_tokens'])} | "
            f"{int(totals['judge_calls'])} | {int(totals['trained_tokens'])} |"
        )
    if base is not None:
        rerun = {
            v: r.report.base_test_score
            for v, r in results.items()
            if v != "base"
            and v not in gold_hidden.VARIANTS  # their job's test is judge-scored
            and r.report.base_test_score is not None
        }
        if rerun:
            same = all(abs(s - (base.report.test_score or 0.0)) < 1e-9 for s in rerun.values())
            lines += [
                "",
                "Every trained variant also re-evaluated the base system on test (greedy): "
                + ", ".join(f"{v} {s:.3f}" for v, s in rerun.items())
                + (" — equal to base." if same else " — NOT equal to base: check determinism."),
            ]
    lines += three_way_lines(task, results)
    return [*lines, "", f"![{task.name}: test scores per variant]({plot_name})", ""]


def three_way_lines(task: Task, results: dict[str, VariantResult]) -> list[str]:
    """The gold path against the variants whose loop never saw gold (judge-scored, feedback):
    their test scores re-scored by the task metric, paired against base and against full,
    and the share of the gold path's gain each keeps."""
    hidden = [v for v in gold_hidden.VARIANTS if v in results]
    base, full = results.get("base"), results.get("full")
    if not hidden:
        return []
    metric = task.job["system"].get("metric", "exact_match")
    full_gain = compare(base, full, [metric]).get(metric, {}) if base and full else {}
    lines = [
        "",
        f"### Three-way: gold path, judge-scored, simulated feedback (test `{metric}` against "
        "gold for every variant; the judge-scored loops never saw it)",
        "",
        f"Rubric: {gold_hidden.rubric(task.name, task.job['system'])}",
        "",
        f"| variant | {metric} | Δ vs base | Δ vs full | McNemar p vs full | "
        "share of the gold-path gain kept |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for variant in ["full", *hidden]:
        result = results.get(variant)
        if result is None:
            continue
        vs_base = compare(base, result, [metric]).get(metric, {}) if base else {}
        vs_full = (
            compare(full, result, [metric]).get(metric, {}) if full and result is not full else {}
        )
        share = "-" if variant == "full" else gold_hidden.share_of_gain(vs_base, full_gain)
        lines.append(
            f"| {variant} | {_mean([s[metric] for s in result.scores.values()]):.3f} | "
            f"{_delta(vs_base)} | {_delta(vs_full)} | {_p(vs_full)} | {share} |"
        )
    lines += [
        "",
        "Their val scores above (val base → best) are the judge's, under the rubric, not the "
        "task metric; their judge calls include scoring every rollout, replay and val output "
        f"(budget {gold_hidden.JUDGE_BUDGET_FACTOR}× the gold path's).",
    ]
    return lines


def kept_sections(text: str) -> dict[str, list[str]]:
    """The ``## <task>`` sections of an earlier report, by task, each line as it was."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip(), [])
        if current is not None:
            current.append(line)
    return sections


def write_report(
    tasks: list[Task],
    results: dict[str, dict[str, VariantResult]],
    md: Path,
    command: Sequence[str] = (),
) -> str:
    """Write ``md`` with a section per task of this run, keeping the sections an earlier run
    wrote for other tasks, and one plot per task of this run beside it."""
    import torch

    produced = (
        f"Run {datetime.date.today()} on {machine.describe()}, "
        f"torch threads {torch.get_num_threads()}, by "
        f"`{' '.join(['python benchmarks/quality.py', *command])}`."
    )
    header = [
        "# cotune quality benchmark",
        "",
        "Every component is the same base model with one LoRA adapter each; the judge is that "
        "same small model (no larger judge on a CPU). Data: `python benchmarks/data.py` "
        "(BIG-bench 1.0.0's SQuAD v1.1 dev, object_counting and "
        "reasoning_about_colored_objects, seeded splits; BIG-bench word_sorting is held out "
        "and never used here). colored-objects, the chain task, runs with its job's own "
        "training even under --quick (benchmarks/results/chain-selection.md, revision 1).",
        "",
        "Variants: "
        + "; ".join(f"**{v}**: {d}" for v, d in VARIANTS.items())
        + ". The no-verify ablation is the loop's `verify_by_replay: false`, binary-verify "
        "its `graded_verification: false`.",
        "",
    ]
    sections = kept_sections(md.read_text(encoding="utf-8")) if md.exists() else {}
    md.parent.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        if results.get(task.name):
            png = md.with_name(f"{md.stem}-{task.name}.png")
            plot(task, results[task.name], png)
            sections[task.name] = task_section(
                task, results[task.name], produced=produced, plot_name=png.name
            )
    order = [*TASKS, *sorted(set(sections) - set(TASKS))]
    body = [line for name in order for line in sections.get(name, [])]
    text = "\n".join(header + body).rstrip("\n")
    md.write_text(text + "\n")
    return text


def plot(task: Task, results: dict[str, VariantResult], path: Path) -> None:
    """A bar per variant: its mean test score with a bootstrap 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = task.job["system"].get("metric", "exact_match")
    names: list[str] = []
    means: list[float] = []
    errors: list[list[float]] = [[], []]
    n = 0
    for variant, result in results.items():
        values = [s[metric] for s in result.scores.values()]
        low, high = bootstrap_interval(values)
        mean, n = _mean(values), len(values)
        names.append(variant)
        means.append(mean)
        errors[0].append(max(mean - low, 0.0))
        errors[1].append(max(high - mean, 0.0))
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar(names, means, yerr=errors, capsize=4, color="#4878a8")
    ax.set(title=f"{task.name} (test, n={n})", ylabel=f"{metric} (95 % CI)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the command ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {TASKS}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of variants")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small configuration: {QUICK} (FULL_TRAINING tasks: every train row)",
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny model on its tiny-kb task")
    parser.add_argument("--model-path", type=Path, help="a local model folder for every model")
    parser.add_argument("--train", type=int, help="use the first N train rows")
    parser.add_argument("--val", type=int, help="use the first N val rows")
    parser.add_argument("--test", type=int, help="use the first N test rows")
    parser.add_argument("--epochs", type=int, help="loop epochs (default: the job's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.model_path is not None:
        args.model_path = args.model_path.resolve()
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    tasks = ["tiny-kb"] if args.tiny else [t for t in args.tasks.split(",") if t]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS] + [
        t for t in tasks if t not in (*TASKS, "tiny-kb") and not (CANDIDATES / t).is_dir()
    ]
    if unknown:
        parser.error(f"unknown task or variant {unknown}; tasks {TASKS}, variants {list(VARIANTS)}")

    import torch

    torch.set_num_threads(min(os.cpu_count() or 2, 16))
    suffix = "-tiny" if args.tiny else "-quick" if args.quick else ""
    runs = args.out / f"runs{suffix}"
    loaded = [load_task(name, args, runs) for name in tasks]
    if any(not (runs / t.name / v / "metrics.json").exists() for t in loaded for v in variants):
        start_engines(loaded)
    results: dict[str, dict[str, VariantResult]] = {}
    for task in loaded:
        for variant in variants:
            started = time.perf_counter()
            if variant in gold_hidden.VARIANTS:  # the stripped splits, the simulated feedback
                job_map = variant_job(task, variant)
                gold_hidden.prepare(task.name, variant, task.job, job_map, task.folder)
            what = run_variant(
                task, variant, runs / task.name / variant, progress=not args.no_progress
            )
            print(
                f"{task.name} {variant}: {what} ({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
            )
        gold = gold_hidden.gold_answers(Path(task.job["data"]["test"]), task.job["system"])
        results[task.name] = {
            v: r
            for v in VARIANTS  # every finished variant, in a fixed order
            if (
                r := load_result(
                    runs / task.name / v,
                    v,
                    task.metrics,
                    gold if v in gold_hidden.VARIANTS else None,  # re-scored by gold
                )
            )
            is not None
        }
    md = args.out / f"quality{suffix}.md"
    command = list(sys.argv[1:] if argv is None else argv)
    print(write_report(loaded, results, md, command))
    print(f"report: {md} (plots beside it)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
