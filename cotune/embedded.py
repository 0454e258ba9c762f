"""Run a job in-process: SQLite and a local folder, no servers. ``cotune run`` and ``demo``.

Output folder layout::

    out/cotune.db        job store (SQLite)        out/artifacts/   every stage's output
    out/adapters/<c>/    the best epoch's adapters out/report.md    tables per epoch/component
    out/metrics.json     the JobReport             out/curves.png   scores and losses
    out/traces/test.jsonl  test traces of the best system
    out/cotune.log       what vLLM, torch and transformers printed (unless --verbose)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotune import console
from cotune.errors import CotuneError
from cotune.jobs.lifecycle import Lifecycle, Step
from cotune.spec.job import JobSpec, load_job

if TYPE_CHECKING:
    from cotune.records import JobReport
    from cotune.runner import JobContext
    from cotune.settings import Settings
    from cotune.store import ArtifactStore, JobStore

JOB_FILE = "job.json"
LOG_FILE = "cotune.log"


OWNER = "embedded"


def local_settings(out: Path) -> Settings:
    """An output folder's settings: a SQLite job store and a local artifact store in it."""
    from cotune.settings import Settings

    return Settings(
        # A local run: the server's production checks on unsafe defaults do not apply.
        environment="development",
        database_url=f"sqlite:///{(out / 'cotune.db').resolve()}",
        artifacts=str((out / "artifacts").resolve()),
        workdir=str((out / "work").resolve()),
    )


def local_lifecycle(out: Path) -> Lifecycle:
    """The lifecycle over an output folder's stores (created and migrated on first use)."""
    from cotune.store import ArtifactStore, JobStore, migrate

    out.mkdir(parents=True, exist_ok=True)
    settings = local_settings(out)
    migrate(settings.database_url)
    return Lifecycle(JobStore(settings.database_url), ArtifactStore(settings.artifacts), settings)


def open_output(out: Path, job: JobSpec, *, resume: bool) -> tuple[JobStore, ArtifactStore, str]:
    """The output folder's stores and the job they hold: a new one (``validating_files``), or
    with ``resume`` the one the folder already holds."""
    from cotune.store import JobStatus

    life = local_lifecycle(out)
    store = life.store
    marker = out / JOB_FILE
    if marker.exists():
        job_id = json.loads(marker.read_text())["job_id"]
        if not resume:
            raise CotuneError(
                f"{out} already holds job {job_id}; pass --resume to continue "
                "it, or choose another --out"
            )
        record = store.get_job(job_id)
        if record is None:
            raise CotuneError(f"{out / JOB_FILE} names job {job_id}, which {out} does not hold")
        status = record.status
        if status in (JobStatus.succeeded, JobStatus.cancelled):
            raise CotuneError(f"job {job_id} in {out} is already {status}")
        if status == JobStatus.failed:
            life.resume(job_id)
    else:
        if resume:
            raise CotuneError(f"--resume: {out} holds no job to resume")
        job_id = life.create(job.system.name, job.model_dump(mode="json"))
        marker.write_text(json.dumps({"job_id": job_id}))
    return store, life.artifacts, job_id


def run_embedded(
    job: JobSpec,
    out: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    context_options: Mapping[str, Any] | None = None,
) -> JobReport:
    """Run ``job`` to the end in this process through the one lifecycle (validate, queue,
    run every stage, finalize into ``out``); return its JobReport. ``context_options``: extra
    ``JobContext`` fields (tests pass scripted engines and a trainer)."""
    store, artifacts, job_id = open_output(out, job, resume=resume)
    life = Lifecycle(store, artifacts, local_settings(out))
    bars = _Bars() if progress else None
    options = dict(context_options or {})
    if bars is not None:
        options.update(progress=bars.update, on_stage_done=bars.done)
    life.context_options = options

    def export(ctx: JobContext, report: JobReport) -> None:
        from cotune.report import copy_adapters, write_outputs

        report.adapters = copy_adapters(ctx, report.adapters, out / "adapters")
        write_outputs(ctx, report, out)

    try:
        done = life.validate(job_id, OWNER, check_models=True, job=job)
        if done.error is None:
            done = life.advance(job_id, OWNER, job=job)
    except BaseException as err:  # Ctrl-C too: the job is failed, and --resume carries it on
        life.fail(job_id, OWNER, err)
        raise
    finally:
        if bars:
            bars.close()
    if done.step == Step.finished:
        done = life.finalize(job_id, OWNER, done=done, export=export)
    if done.error is not None:
        raise done.error
    if done.step != Step.succeeded or done.report is None:
        raise CotuneError(f"job {job_id} did not finish: {done.step.value}")
    return done.report


class _Bars:
    """One tqdm bar per stage run, closed when the next stage starts."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.stage: str | None = None

    def update(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None or stage != self.stage or done < self.bar.n:
            self.close()
            bar = tqdm(total=total, desc=stage, unit="ex", leave=False, file=console.err())
            self.bar, self.stage = bar, stage
        self.bar.update(done - self.bar.n)

    def done(self, record: Any) -> None:
        """One line per finished stage, so the log shows where the time went."""
        from tqdm import tqdm

        self.close()
        once = record.stage.value in ("baseline", "test")
        where = "job" if once else f"epoch {record.epoch}"
        tqdm.write(
            f"{where:>8} {record.stage.value:<10} {record.seconds:7.1f} s  "
            f"{record.engine_calls} engine calls, {record.completion_tokens} tokens"
            + (f", {record.judge_calls} judge calls" if record.judge_calls else "")
            + (f", {record.trained_tokens} trained tokens" if record.trained_tokens else ""),
            file=console.err(),
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_job_cli(
    job_path: Path, *, out: Path | None, resume: bool, dry_run: bool, verbose: bool = False
) -> int:
    """``cotune run``: the job in this process; library output goes to ``OUT/cotune.log``
    unless ``verbose``."""
    job = load_job(job_path)
    if dry_run:
        from cotune.quote import format_quote, quote_job

        print(format_quote(quote_job(job)), file=console.out())
        return 0
    out = out or Path("runs") / job.system.name
    log = None if verbose else out / LOG_FILE
    with console.quiet_output(log, announce=True):
        report = run_embedded(job, out, resume=resume)
        from cotune.report import summary_table

        print(summary_table(report), file=console.out())
        print(f"adapters: {out / 'adapters'}\nreport: {out / 'report.md'}", file=console.out())
    return 0


def demo(*, tiny: bool, out: Path, verbose: bool = False) -> int:
    """The README's first command: a short kb-qa job, on SmolLM2-135M or the tiny model."""
    from cotune.models import prepare_model

    examples = Path(__file__).resolve().parents[1] / "examples"
    with console.quiet_output(None if verbose else out / LOG_FILE):
        if tiny:
            from cotune.tiny import write_tiny_example

            model = prepare_model("tiny", progress=console.say)
            folder = write_tiny_example(out / "tiny-kb", model_path=str(model))
            job_file = folder / "job.yaml"
            # Rates that teach the tiny answer writer its hedged colours (tests/e2e.py TRAIN).
            job_file.write_text(
                "system: system.yaml\n"
                "data: {train: train.jsonl, val: val.jsonl, test: test.jsonl}\n"
                "judge: {model: tiny}\n"
                "loop: {epochs: 2, rollout_batch: 32, samples_per_component: 48,"
                " judge_samples: 1}\n"
                "train: {epochs: 3, batch_size: 8, learning_rate: 5.0e-3,"
                " dpo_learning_rate: 1.0e-3}\n"
            )
        else:
            prepare_model("smollm2-135m", progress=console.say)
            job_file = examples / "kb-qa" / "job.yaml"
        console.say(f"running {job_file} -> {out / 'run'}")
        return run_job_cli(
            job_file,
            out=out / "run",
            resume=(out / "run" / JOB_FILE).exists(),
            dry_run=False,
            verbose=verbose,
        )
