"""Pricing a job before running it: engine calls, generated tokens and judge calls per stage.

Upper bounds where the outcome is unknown: every rollout trace is assumed to fail (so judged and
corrected), every LLM output to run to its ``max_tokens``; joint candidates
(``loop.joint_candidates``) are priced with every joint accepted and replayed once per member
left out, augmentation with every rollout failing and corrected and every paraphrase kept. With
``metric: judge`` every scored output also costs K judge samples, each repaired once (no cache
hit assumed). Rated runs (``data.feedback``) are fixed traces: each is assumed rated bad every
epoch, re-run once to reconstruct its spans, judged, corrected, and its original output scored
once for verify. The budget counts every judge call but cuts only learning (rollout, credit,
verify, synthesize), never measuring (baseline, evaluate, test): the total is at most the budget
plus measuring.
"""

from __future__ import annotations

from typing import Any

from cotune.judge.score import SCORE_MAX_TOKENS
from cotune.metrics import JUDGE
from cotune.spec.job import JobSpec


def quote_job(
    job: JobSpec,
    *,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    n_feedback: int | None = None,
) -> dict[str, Any]:
    from cotune.feedback import load_feedback
    from cotune.openai_jobs import load_split

    def count(split: str, given: int | None) -> int:
        if given is not None:
            return given
        if split == "feedback":
            path = job.data_path("feedback")
            return 0 if path is None else len(load_feedback(path, job.system))
        return len(load_split(job, split))  # type: ignore[arg-type]

    system, loop = job.system, job.loop
    n_train, n_val, n_test = count("train", n_train), count("val", n_val), count("test", n_test)
    n_feedback = count("feedback", n_feedback)
    if loop.val_limit:
        n_val = min(n_val, loop.val_limit)
    llms = system.llm_components
    per_run_tokens = sum(c.max_tokens for c in llms)
    batch = min(loop.rollout_batch, n_train)
    judge_max = job.judge.max_tokens if job.judge else 0
    judged = system.metric == JUDGE and job.judge is not None
    score_calls = 2 * loop.judge_samples if judged else 0  # per scored output, with repairs
    score_tokens = min(judge_max, SCORE_MAX_TOKENS)

    def run(examples: int) -> dict[str, int]:
        return {
            "engine_requests": examples * (len(llms) + score_calls),
            "generated_tokens": examples * (per_run_tokens + score_calls * score_tokens),
            "judge_calls": examples * score_calls,
        }

    judged_traces = batch + n_feedback
    judge_calls = judged_traces * loop.judge_samples * 2 if job.judge else 0  # one repair each
    trainable = len(system.trainable_components)
    candidates = judged_traces * (trainable * max(loop.resample_candidates, 1))
    joints = _joint_replays(job, judged_traces, candidates)
    rerun = {  # rebuilding a rated run's spans generates them; its rating is its score
        "engine_requests": n_feedback * len(llms),
        "generated_tokens": n_feedback * per_run_tokens,
        "judge_calls": 0,
    }
    originals = {k: v - rerun[k] for k, v in run(n_feedback).items()}  # scored, not run
    # augmentation: per round, the rollouts and, for each failed one, its re-sampled
    # candidates (each sampled, priced as a run, and replayed), its gold candidate and the
    # joints of these (a leave-one-out replay per member)
    fixes = 2 * trainable * loop.resample_candidates + 1
    # paraphrases (loop.paraphrases): asked of the judge once per epoch, all assumed kept and
    # rolled out in every round beside the train split
    asked = n_train * loop.paraphrases if job.judge and loop.augment_rollouts else 0
    augment = (n_train + asked + n_feedback) * loop.augment_rollouts
    corrections = run(augment * (fixes + trainable * _joints_on(job)))
    per_replay = loop.replays * (2 if loop.replays > 1 else 1)  # R, and R unmodified with R > 1
    stages: dict[str, dict[str, int]] = {
        "baseline": run(n_val),
        "rollout": {k: v + rerun[k] for k, v in run(batch).items()},
        "credit": {
            "engine_requests": judge_calls,
            "generated_tokens": judge_calls * judge_max,
            "judge_calls": judge_calls,
        },
        "verify": {k: v * per_replay + originals[k] for k, v in run(candidates + joints).items()},
        "synthesize": {
            k: v
            + corrections[k] * per_replay
            + asked * (judge_max if k == "generated_tokens" else 1)
            for k, v in run(augment).items()
        },
        "train": {"engine_requests": 0, "generated_tokens": 0, "judge_calls": 0},
        "evaluate": run(n_val),
        "test": run(2 * n_test),
    }
    per_epoch = ["rollout", "credit", "verify", "synthesize", "evaluate"]
    total = {
        k: stages["baseline"][k]
        + stages["test"][k]
        + loop.epochs * sum(stages[s][k] for s in per_epoch)
        for k in ("engine_requests", "generated_tokens", "judge_calls")
    }
    if job.budget.max_judge_calls is not None:
        measuring = sum(stages[s]["judge_calls"] for s in ("baseline", "test"))
        measuring += loop.epochs * stages["evaluate"]["judge_calls"]
        learning = min(total["judge_calls"] - measuring, job.budget.max_judge_calls)
        total["judge_calls"] = learning + measuring
    return {
        "job": system.name,
        "epochs": loop.epochs,
        "examples": {"train": n_train, "val": n_val, "test": n_test}
        | ({"feedback": n_feedback} if n_feedback else {}),
        "per_stage": stages,
        "total": total,
        "budget": job.budget.model_dump(),
        "trainable_components": [c.name for c in system.trainable_components],
    }


def _joints_on(job: JobSpec) -> int:
    """1 where the loop replays joint candidates (``loop.joint_candidates``, verification on)."""
    return int(job.loop.joint_candidates and job.loop.verify_by_replay)


def _joint_replays(job: JobSpec, batch: int, candidates: int) -> int:
    """System runs the joint candidates of one verify stage may add, at most: each judge
    verdict's joint of a failed trace, and each refused single completed downstream first
    (its own replay reused when R = 1), each replayed once more per member left out."""
    if not _joints_on(job):
        return 0
    members = len(job.system.trainable_components)
    verdicts = batch * job.loop.judge_samples if job.judge else 0
    singles = candidates if job.loop.replays > 1 else 0
    return (verdicts + singles) * (1 + members) + candidates * members


def format_quote(quote: dict[str, Any]) -> str:
    lines = [
        f"quote for {quote['job']}: {quote['epochs']} epochs, examples {quote['examples']}",
        "(upper bounds: every trace fails, every output runs to max_tokens)",
        "",
        "| stage | per | engine requests | generated tokens | judge calls |",
        "| --- | --- | --- | --- | --- |",
    ]
    for stage, cost in quote["per_stage"].items():
        per = "job" if stage in ("baseline", "test") else "epoch"
        lines.append(
            f"| {stage} | {per} | {cost['engine_requests']} | "
            f"{cost['generated_tokens']} | {cost['judge_calls']} |"
        )
    t = quote["total"]
    lines.append(
        f"| total | job | {t['engine_requests']} | {t['generated_tokens']} | {t['judge_calls']} |"
    )
    lines.append(f"\nbudget: {quote['budget']}")
    return "\n".join(lines)
