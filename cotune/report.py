"""What a finished job leaves behind: metrics.json, report.md, curves.png and test traces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cotune.records import JobReport


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


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
            "| component | samples | pairs | verified fixes | blame rate | adapter |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for c in best.components:
            adapter = report.adapters.get(c.component, "-")
            lines.append(
                f"| {c.component} | {c.samples} | {c.pairs} | "
                f"{c.candidates_verified}/{c.candidates_proposed} | "
                f"{c.blame_rate:.2f} | {adapter} |"
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
        "| epoch | component | blame rate | proposed | verified | samples | pairs | "
        "trained | last SFT loss | last DPO loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in report.epochs:
        for c in e.components:
            trained = "yes" if c.trained else f"no ({c.skipped_reason})"
            parts.append(
                f"| {e.epoch} | {c.component} | {c.blame_rate:.2f} | {c.candidates_proposed} | "
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


def write_outputs(ctx: Any, report: JobReport, out: Path) -> None:
    (out / "metrics.json").write_text(report.model_dump_json(indent=2) + "\n")
    (out / "report.md").write_text(markdown_report(report))
    plot_curves(report, out / "curves.png")
    from cotune.loop import Stage, _stage_output

    final = _stage_output(ctx, ctx.job.loop.epochs + 1, Stage.test)
    if final and final.get("traces"):
        (out / "traces").mkdir(exist_ok=True)
        with open(out / "traces" / "test.jsonl", "w", encoding="utf-8") as handle:
            for trace in final["traces"]:
                handle.write(json.dumps(trace) + "\n")


def load_report(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))
