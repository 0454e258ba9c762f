"""What a finished job leaves behind: its report (built from the stored stage outputs),
metrics.json, report.md, curves.png, test traces and the exported adapters."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from cotune.records import (
    BufferCount,
    ComponentEpochRecord,
    ComponentTraining,
    CreditOut,
    EpochRecord,
    EvaluateOut,
    JobReport,
    RolloutOut,
    Stage,
    SynthesizeOut,
    TestOut,
    TrainOut,
    VerifyOut,
)
from cotune.runner import JobContext, final_output, stored_output


def epoch_record(ctx: JobContext, epoch: int) -> EpochRecord:
    """Per-epoch and per-component numbers, rebuilt from the stored stage outputs."""
    rollout_out = stored_output(ctx, epoch, Stage.rollout, RolloutOut)
    credit = stored_output(ctx, epoch, Stage.credit, CreditOut) or CreditOut(failed=0)
    checked = stored_output(ctx, epoch, Stage.verify, VerifyOut) or VerifyOut()
    synthesized = stored_output(ctx, epoch, Stage.synthesize, SynthesizeOut) or SynthesizeOut()
    trained = stored_output(ctx, epoch, Stage.train, TrainOut) or TrainOut(adapters={})
    evaluation = stored_output(ctx, epoch, Stage.evaluate, EvaluateOut)
    failed = max(credit.failed, 1)
    # A span's id is its component's name: the judge's decisive span names the component.
    judged = [o for o in credit.outcomes if o.ok]
    decisive = Counter(o.decisive_span() for o in judged)
    components = []
    for component in ctx.job.system.trainable_components:
        name = component.name
        mine = [c for c in checked.candidates if c.component == name]
        fixed = {c.trace_id for c in mine if c.verified}
        info = trained.components.get(name) or ComponentTraining(trained=False)
        counts = synthesized.counts.get(name) or BufferCount()
        components.append(
            ComponentEpochRecord(
                epoch=epoch,
                component=name,
                blame_rate=round(decisive[name] / len(judged), 4) if judged else None,
                verified_rate=round(len(fixed) / failed, 4),
                candidates_proposed=len(mine),
                candidates_verified=sum(c.verified for c in mine),
                samples=counts.samples,
                pairs=counts.pairs,
                trained=info.trained,
                skipped_reason=info.skipped_reason,
                sft_losses=info.sft_losses,
                dpo_losses=info.dpo_losses,
                adapter=info.adapter,
            )
        )
    return EpochRecord(
        epoch=epoch,
        train_score=rollout_out.score if rollout_out else None,
        val_score=evaluation.score if evaluation else None,
        kept=bool(evaluation and evaluation.kept),
        judge_failures=credit.judge_failures,
        components=components,
    )


def build_report(
    ctx: JobContext,
    base_val: float,
    best_val: float,
    final: TestOut,
    stop_reason: str | None,
) -> JobReport:
    epochs = ctx.store.epochs(ctx.job_id)
    kept = [e.epoch for e in epochs if e.kept]
    return JobReport(
        job_name=ctx.job.system.name,
        status="succeeded",
        base_val_score=base_val,
        best_epoch=kept[-1] if kept else None,
        best_val_score=best_val,
        base_test_score=final.base,
        test_score=final.best,
        stop_reason=stop_reason,
        epochs=epochs,
        stages=ctx.store.stages(ctx.job_id),
        adapters=final.adapters,
    )


def copy_adapters(ctx: JobContext, adapters: dict[str, str], out: Path) -> dict[str, str]:
    """Export the best adapters to ``out/<component>/``."""
    written = {}
    for component, key in adapters.items():
        target = out / component
        shutil.rmtree(target, ignore_errors=True)
        ctx.artifacts.get_dir(key, target)
        written[component] = str(target)
    return written


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def summary_table(report: JobReport) -> str:
    """Base vs trained, per system and per component: the demo's closing table."""
    lines = [
        "| | val | test |",
        "| --- | --- | --- |",
        f"| base system | {_fmt(report.base_val_score)} | {_fmt(report.base_test_score)} |",
        f"| trained (epoch {report.best_epoch or '-'}) | {_fmt(report.best_val_score)} | "
        f"{_fmt(report.test_score)} |",
    ]
    if report.best_epoch is None:
        lines.append("\nNo epoch beat the base system: the result is the base system.")
    best = next((e for e in report.epochs if e.epoch == report.best_epoch), None)
    if best is not None:
        lines += [
            "",
            "| component | samples | pairs | verified fixes | blame rate | verified rate "
            "| adapter |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in best.components:
            adapter = report.adapters.get(c.component, "-")
            lines.append(
                f"| {c.component} | {c.samples} | {c.pairs} | "
                f"{c.candidates_verified}/{c.candidates_proposed} | "
                f"{_rate(c.blame_rate)} | {_rate(c.verified_rate)} | {adapter} |"
            )
    if report.stop_reason:
        lines.append(f"\nStopped early: {report.stop_reason}")
    return "\n".join(lines)


def markdown_report(report: JobReport) -> str:
    parts = [
        f"# cotune report: {report.job_name}",
        "",
        summary_table(report),
        "",
        "## Epochs",
        "",
        "| epoch | train | val | kept | judge failures |",
        "| --- | --- | --- | --- | --- |",
    ]
    for e in report.epochs:
        parts.append(
            f"| {e.epoch} | {_fmt(e.train_score)} | {_fmt(e.val_score)} | "
            f"{'yes' if e.kept else 'no'} | {e.judge_failures} |"
        )
    parts += [
        "",
        "## Components per epoch",
        "",
        "| epoch | component | blame rate | verified rate | proposed | verified | samples | "
        "pairs | trained | last SFT loss | last DPO loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in report.epochs:
        for c in e.components:
            trained = "yes" if c.trained else f"no ({c.skipped_reason})"
            parts.append(
                f"| {e.epoch} | {c.component} | {_rate(c.blame_rate)} | "
                f"{_rate(c.verified_rate)} | {c.candidates_proposed} | "
                f"{c.candidates_verified} | {c.samples} | {c.pairs} | {trained} | "
                f"{_fmt(c.sft_losses[-1] if c.sft_losses else None)} | "
                f"{_fmt(c.dpo_losses[-1] if c.dpo_losses else None)} |"
            )
    parts += [
        "",
        "## Cost per stage",
        "",
        "| epoch | stage | seconds | engine calls | prompt tokens | completion tokens | "
        "judge calls | trained tokens |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in report.stages:
        parts.append(
            f"| {s.epoch} | {s.stage} | {s.seconds:.1f} | {s.engine_calls} | "
            f"{s.prompt_tokens} | {s.completion_tokens} | {s.judge_calls} | "
            f"{s.trained_tokens} |"
        )
    totals = report.totals()
    parts.append(
        f"| all | | {totals['seconds']:.1f} | {int(totals['engine_calls'])} | "
        f"{int(totals['prompt_tokens'])} | {int(totals['completion_tokens'])} | "
        f"{int(totals['judge_calls'])} | {int(totals['trained_tokens'])} |"
    )
    return "\n".join(parts) + "\n"


def plot_curves(report: JobReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (scores, losses) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [0] + [e.epoch for e in report.epochs]
    scores.plot(
        epochs,
        [report.base_val_score] + [e.val_score for e in report.epochs],
        marker="o",
        label="val",
    )
    scores.plot(
        [e.epoch for e in report.epochs],
        [e.train_score for e in report.epochs],
        marker="s",
        label="train rollout",
    )
    scores.set(xlabel="epoch", ylabel="score", title="system score")
    scores.legend()
    for e in report.epochs:
        for c in e.components:
            if c.sft_losses:
                losses.plot(c.sft_losses, label=f"{c.component} SFT (epoch {e.epoch})")
    losses.set(xlabel="step", ylabel="loss", title="training loss")
    if losses.lines:
        losses.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(ctx: JobContext, report: JobReport, out: Path) -> None:
    (out / "metrics.json").write_text(report.model_dump_json(indent=2) + "\n")
    (out / "report.md").write_text(markdown_report(report))
    plot_curves(report, out / "curves.png")
    final = final_output(ctx)
    if final and final.traces:
        (out / "traces").mkdir(exist_ok=True)
        with open(out / "traces" / "test.jsonl", "w", encoding="utf-8") as handle:
            for trace in final.traces:
                handle.write(json.dumps(trace.model_dump(mode="json")) + "\n")
