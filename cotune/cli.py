"""The ``cotune`` command. Each subcommand parses its arguments and calls the core."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from cotune import console
from cotune.errors import CotuneError

REPO_EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _quiet_libraries() -> None:
    """Progress bars and tables are the CLI's output; vLLM's and transformers' info logs drown
    them. Users can turn them back on with VLLM_LOGGING_LEVEL / TRANSFORMERS_VERBOSITY."""
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except CotuneError as err:
        print(f"cotune: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cotune: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cotune", description="Fine-tune the models inside a compound AI system."
    )
    sub = parser.add_subparsers(title="commands")

    models = sub.add_parser("models", help="register, prepare and list models").add_subparsers()
    prepare = models.add_parser("prepare", help="download and convert a built-in model once")
    prepare.add_argument("name", help="a built-in model, e.g. smollm2-135m")
    prepare.add_argument("--force", action="store_true", help="rebuild even if prepared")
    prepare.set_defaults(handler=cmd_models_prepare)
    _add_models_add(models)
    remove = models.add_parser("remove", help="unregister a model no unfinished job names")
    remove.add_argument("name")
    remove.set_defaults(handler=cmd_models_remove)
    listing = models.add_parser("list", help="built-in and registered models, with their status")
    listing.set_defaults(handler=cmd_models_list)
    tiny = models.add_parser("tiny", help="build the tiny test model into DIR")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument(
        "--seed", type=int, default=0, help="another seed builds a different tiny model (0)"
    )
    tiny.set_defaults(handler=cmd_models_tiny)

    ev = sub.add_parser("eval", help="run a system over a data file and score it")
    ev.add_argument("system", type=Path, help="system spec (YAML or JSON)")
    ev.add_argument("data", type=Path, help="JSONL or CSV rows")
    ev.add_argument("--adapters", type=Path, help="folder of <component>/ PEFT adapters")
    ev.add_argument("--out", type=Path, help="write traces.jsonl and score.json here")
    ev.add_argument("--engine", choices=["vllm", "transformers"], default="vllm")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--limit", type=int, help="only the first N rows")
    ev.add_argument(
        "--judge",
        metavar="MODEL",
        help="metric judge: score with this judge (a model alias of the system or a registry "
        "name) under the system's rubric; without it such a system's outputs stay unscored",
    )
    ev.add_argument("--judge-samples", type=int, default=1, help="seeded judge samples (mean)")
    ev.add_argument(
        "--gold-metric",
        metavar="METRIC",
        help="with --judge: hide each row's expected from the judge and count how its passes "
        "agree with METRIC against expected (is this judge fit to score without gold?)",
    )
    ev.add_argument(
        "--gold-threshold", type=float, default=1.0, help="a METRIC score this high is right"
    )
    _add_verbose(ev)
    ev.set_defaults(handler=cmd_eval)

    run = sub.add_parser("run", help="run a training job in-process (SQLite + a local folder)")
    run.add_argument("job", type=Path, help="job spec (YAML or JSON)")
    run.add_argument("--out", type=Path, help="output folder (default runs/<job name>)")
    run.add_argument("--resume", action="store_true", help="continue from the last finished stage")
    run.add_argument("--dry-run", action="store_true", help="print a quote, run nothing")
    _add_verbose(run)
    run.set_defaults(handler=cmd_run)

    serve = sub.add_parser("serve", help="run the HTTP API (with Celery, or --embedded)")
    serve.add_argument(
        "--embedded",
        action="store_true",
        help="run jobs in this process (SQLite or PostgreSQL, no Redis)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(handler=cmd_serve)

    system = sub.add_parser(
        "serve-system",
        help="serve a downloaded bundle as the whole system: POST /v1/run, ratings, traces",
    )
    system.add_argument("bundle", type=Path, help="a bundle folder (`cotune download JOB`)")
    system.add_argument("--host", default="127.0.0.1")
    system.add_argument("--port", type=int, default=8100)
    system.add_argument("--engine", choices=["vllm", "transformers"], default="vllm")
    system.add_argument(
        "--traces",
        type=Path,
        help="the trace log's folder (default: COTUNE_SYSTEM_TRACES, else "
        "$COTUNE_HOME/system-traces)",
    )
    system.set_defaults(handler=cmd_serve_system)

    feedback = sub.add_parser("feedback", help="the served system's ratings as training data")
    feedback_sub = feedback.add_subparsers()
    export = feedback_sub.add_parser(
        "export", help="write the rated traces as a feedback file (JSONL) for the next job"
    )
    export.add_argument("--traces", type=Path, help="the trace log's folder (as serve-system)")
    export.add_argument("--out", type=Path, required=True, help="the feedback file to write")
    export.add_argument(
        "--since",
        type=_utc_time,
        help="only traces rated at or after this time (ISO 8601, e.g. 2026-12-01 or "
        "2026-12-01T12:00:00+00:00; UTC unless it says)",
    )
    export.add_argument("--tenant", help="only this tenant's traces")
    export.add_argument(
        "--corrected-only",
        action="store_true",
        help="only traces rated with a corrected_output (a job under a gold metric needs one "
        "on every row; rating-only rows need metric: judge)",
    )
    export.set_defaults(handler=cmd_feedback_export)

    worker = sub.add_parser("worker", help="run a Celery worker (queues gpu and cpu)")
    _add_worker_arguments(worker)
    worker.set_defaults(handler=cmd_worker)

    keys = sub.add_parser("keys", help="create, list and revoke API keys (admin)")
    keys_sub = keys.add_subparsers()
    create = keys_sub.add_parser("create", help="create a key; it is printed once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name")
    create.set_defaults(handler=cmd_keys_create)
    klist = keys_sub.add_parser("list", help="list keys (never the secrets)")
    klist.add_argument("--tenant")
    klist.set_defaults(handler=cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.add_argument("--tenant")
    revoke.set_defaults(handler=cmd_keys_revoke)

    _add_client_commands(sub)

    demo = sub.add_parser("demo", help="the first run: prepare SmolLM2 and train kb-qa on it")
    demo.add_argument("--tiny", action="store_true", help="a short run on the tiny model")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    _add_verbose(demo)
    demo.set_defaults(handler=cmd_demo)
    return parser


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show vLLM's, torch's and transformers' output here (default: cotune.log in the "
        "output folder)",
    )


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from cotune.models import prepare_model

    path = prepare_model(args.name, force=args.force)
    print(path)
    return 0


def _add_models_add(models: Any) -> None:
    add = models.add_parser(
        "add", help="register a model (a hub repository, a local folder or a GGUF) and prepare it"
    )
    add.add_argument("name", help="the name jobs give (system.models.<alias>.name, judge.model)")
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="REPO[@REVISION]", help="a Hugging Face Hub repository")
    source.add_argument("--path", metavar="DIR", help="a local Hugging Face model folder")
    source.add_argument("--gguf", metavar="FILE", help="a GGUF file (converted to safetensors)")
    add.add_argument("--chat-template", type=Path, metavar="FILE", help="a Jinja chat template")
    add.add_argument("--max-model-len", type=int, metavar="N", help="cap the engine's context")
    add.add_argument("--tensor-parallel", type=int, default=1, metavar="N", help="GPUs per engine")
    add.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    add.set_defaults(handler=cmd_models_add)


def _model_store() -> Any:
    from cotune.settings import get_settings
    from cotune.store import JobStore
    from cotune.store.registry import ModelStore

    settings = get_settings()
    return ModelStore(JobStore(settings.database_url, auto_migrate=settings.should_migrate))


def cmd_models_add(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from cotune.model_records import ModelOptions, SourceKind
    from cotune.model_registry import add_model

    kind, source = next((k, v) for k in ("hf", "path", "gguf") if (v := getattr(args, k)))
    template = None
    if args.chat_template is not None:
        try:
            template = args.chat_template.read_text(encoding="utf-8")
        except OSError as err:
            raise CotuneError(f"--chat-template {str(args.chat_template)!r}: {err}") from None
    try:
        options = ModelOptions(
            chat_template=template,
            max_model_len=args.max_model_len,
            tensor_parallel=args.tensor_parallel,
            dtype=args.dtype,
        )
    except ValidationError as err:
        problem = err.errors()[0]
        field = str(problem["loc"][0]).replace("_", "-")
        raise CotuneError(f"--{field}: {problem['msg']}, got {problem['input']!r}") from None
    model = add_model(
        _model_store(),
        args.name,
        cast("SourceKind", kind),
        source,
        options,
        progress=lambda message: print(message, file=sys.stderr),
    )
    print(model.model_dump_json(exclude={"options": {"chat_template"}}))
    return 0


def cmd_models_remove(args: argparse.Namespace) -> int:
    from cotune.model_registry import remove_model

    remove_model(_model_store(), args.name)
    print(f"removed {args.name}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from cotune.models import list_models

    for entry in list_models():
        print(json.dumps({**entry, "kind": "built-in"}))
    for model in _model_store().list_all():
        print(model.model_dump_json(exclude={"options": {"chat_template"}}))
    return 0


def cmd_models_tiny(args: argparse.Namespace) -> int:
    from cotune.tiny import build_tiny_model

    info = build_tiny_model(args.dir, seed=args.seed, progress=print)
    print(json.dumps(info))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cotune.data import load_examples
    from cotune.runtime import find_adapters, mean_score, open_runtime, score_traces
    from cotune.scoring import judge_agreement
    from cotune.spec import load_system

    system = load_system(args.system)
    _check_judge_args(args, system)
    examples = load_examples(args.data, system, split=args.data.stem)[: args.limit]
    adapters = find_adapters(args.adapters, system) if args.adapters else {}
    if args.adapters and not adapters:
        raise CotuneError(f"--adapters {args.adapters}: no <component>/adapter_config.json there")
    gold = {e.id: e.expected for e in examples if e.expected} if args.gold_metric else {}
    log = None if args.verbose else (args.out or Path("runs") / system.name) / "eval.log"
    with console.quiet_output(log, announce=True):
        runtime = open_runtime(system, engine=args.engine, adapters=adapters)
        scorer = _eval_judge(args, system) if args.judge else None
        traces = []
        bar = tqdm(total=len(examples), desc=f"eval {system.name}", unit="ex", file=console.err())
        with bar:
            for start in range(0, len(examples), args.batch_size):
                batch = runtime.run(examples[start : start + args.batch_size])
                if scorer is None:
                    score_traces(system, batch)
                else:
                    for trace in batch:  # the judge sees no gold when it is being checked
                        trace.expected = None if gold else trace.expected
                    scorer.score(batch)
                    for trace in batch:
                        trace.expected = trace.expected or gold.get(trace.example_id)
                traces.extend(batch)
                bar.update(len(batch))
                bar.set_postfix(score=f"{mean_score(traces):.3f}")
    result = _eval_summary(system.name, system.metric, traces, adapters)
    if scorer is not None:
        result["judge"] = {"model": args.judge, "samples": args.judge_samples,
                           "calls": scorer.calls}  # fmt: skip
    if args.gold_metric:
        agreement = judge_agreement(
            traces, gold, metric=args.gold_metric, threshold=args.gold_threshold
        )
        result["judge"]["agreement"] = agreement.model_dump()  # precision, recall included
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "traces.jsonl", "w", encoding="utf-8") as handle:
            for trace in traces:
                handle.write(trace.model_dump_json() + "\n")
        (args.out / "score.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"traces: {args.out / 'traces.jsonl'}")
    return 0


def _check_judge_args(args: argparse.Namespace, system: Any) -> None:
    from cotune.metrics import JUDGE, known_metrics

    if args.judge and system.metric != JUDGE:
        raise CotuneError(
            f"--judge {args.judge}: system {system.name!r} is scored by metric "
            f"{system.metric!r}; --judge scores a system whose metric is {JUDGE!r}"
        )
    if args.gold_metric and not args.judge:
        raise CotuneError("--gold-metric checks a judge: give --judge MODEL too")
    if args.gold_metric and (args.gold_metric == JUDGE or args.gold_metric not in known_metrics()):
        raise CotuneError(
            f"--gold-metric: unknown metric {args.gold_metric!r}; one of "
            f"{sorted(known_metrics() - {JUDGE})}"
        )
    if args.judge_samples < 1:
        raise CotuneError(f"--judge-samples must be at least 1, got {args.judge_samples}")
    if system.metric == JUDGE and not args.judge:
        print(f"system {system.name!r} is judge-scored: its outputs stay unscored without "
              "--judge MODEL", file=sys.stderr)  # fmt: skip


def _eval_judge(args: argparse.Namespace, system: Any) -> Any:
    """The judge as a job would build it (``JobContext.judge_engine``/``scorer``), greedy with
    one sample, seeded samples at the job's default temperature with more."""
    from cotune.engines import get_engine
    from cotune.judge.score import SCORE_MAX_TOKENS
    from cotune.models import resolve_judge
    from cotune.scoring import JudgeScorer
    from cotune.spec.job import JudgeSpec

    return JudgeScorer(
        get_engine(args.engine, resolve_judge(system, args.judge, param="--judge")),
        system,
        samples=args.judge_samples,
        temperature=JudgeSpec(model=args.judge).temperature,
        max_tokens=SCORE_MAX_TOKENS,
        seed=0,
    )


def _eval_summary(
    name: str, metric: str, traces: list[Any], adapters: dict[str, str]
) -> dict[str, Any]:
    from cotune.runtime import mean_score

    return {
        "system": name,
        "metric": metric,
        "examples": len(traces),
        "score": round(mean_score(traces), 4),
        "passed": sum(1 for t in traces if t.passed),
        "adapters": adapters,
    }


def cmd_run(args: argparse.Namespace) -> int:
    from cotune.embedded import run_job_cli

    return run_job_cli(
        args.job, out=args.out, resume=args.resume, dry_run=args.dry_run, verbose=args.verbose
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from services.api.app import serve

    return serve(args.host, args.port, embedded=args.embedded)


def cmd_serve_system(args: argparse.Namespace) -> int:
    from services.system.app import serve_system

    return serve_system(args.bundle, args.host, args.port, engine=args.engine, traces=args.traces)


def _utc_time(text: str) -> Any:
    import datetime as dt

    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date or time") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def cmd_feedback_export(args: argparse.Namespace) -> int:
    from cotune.serving import TraceLog, export_feedback
    from cotune.settings import get_settings

    settings = get_settings()
    log = TraceLog(
        args.traces or settings.traces_dir(), settings.trace_retention_days, create=False
    )
    try:
        count = export_feedback(
            log,
            args.out,
            since=args.since,
            tenant=args.tenant,
            corrected_only=args.corrected_only,
        )
    finally:
        log.close()
    print(f"exported {count} rated traces to {args.out}")
    return 0


def _add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        from workers.main import add_worker_arguments
    except ImportError:  # the service extra is not installed; the command explains at run time
        return
    add_worker_arguments(parser)


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.main import run_from_args

    return run_from_args(args)


def _accounts() -> Any:
    from cotune.settings import get_settings
    from cotune.store import JobStore
    from cotune.store.accounts import AccountStore

    settings = get_settings()
    return AccountStore(JobStore(settings.database_url, auto_migrate=settings.should_migrate))


def cmd_keys_create(args: argparse.Namespace) -> int:
    key_id, plaintext = _accounts().create_key(args.tenant, name=args.name)
    print(json.dumps({"key_id": key_id, "tenant": args.tenant, "key": plaintext}))
    print("store the key now: it is not shown again", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    for key in _accounts().list_keys(args.tenant):
        print(key.model_dump_json())
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    revoked = _accounts().revoke_key(args.key_id, args.tenant)
    if not revoked:
        raise CotuneError(
            f"no active key {args.key_id!r}"
            + (f" for tenant {args.tenant!r}" if args.tenant else "")
        )
    print(f"revoked {args.key_id}")
    return 0


# -- the client commands: talk to a server through cotune.client ---------------------------------


def _add_client_commands(sub: Any) -> None:
    def client_parser(name: str, help_: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=help_)
        parser.add_argument("--server", help="the API's URL (default $COTUNE_API_URL or :8000)")
        parser.add_argument("--key", help="an API key (default $COTUNE_API_KEY)")
        return parser

    submit = client_parser("submit", "upload a job's local files and submit it to a server")
    submit.add_argument("job", type=Path, help="job spec (YAML or JSON), as for `cotune run`")
    submit.add_argument("--wait", action="store_true", help="follow its events until it ends")
    submit.add_argument(
        "--quote", action="store_true", help="upload its files, then print its price; no job"
    )
    submit.set_defaults(handler=cmd_submit)

    status = client_parser("status", "a job's status and results (or list your jobs)")
    status.add_argument("job_id", nargs="?", help="omit to list your jobs")
    status.add_argument("--json", action="store_true", help="the whole job object")
    status.set_defaults(handler=cmd_status)

    logs = client_parser("logs", "a job's events")
    logs.add_argument("job_id")
    logs.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    logs.set_defaults(handler=cmd_logs)

    cancel = client_parser("cancel", "cancel a job (it stops between stages)")
    cancel.add_argument("job_id")
    cancel.set_defaults(handler=cmd_cancel)

    download = client_parser("download", "download a job's bundle or one component's adapter")
    download.add_argument("job_id")
    download.add_argument("--component", help="only this component's PEFT adapter")
    download.add_argument("--out", type=Path, default=Path("."), help="folder (default: .)")
    download.add_argument("--tar", action="store_true", help="keep the .tar.gz, do not extract")
    download.set_defaults(handler=cmd_download)


def _client(args: argparse.Namespace) -> Any:
    from cotune.client import Client

    return Client(args.server, args.key)


def cmd_submit(args: argparse.Namespace) -> int:
    from cotune.store.status import TERMINAL

    def uploaded(path: Path, file: dict[str, Any]) -> None:
        print(f"uploaded {path} -> {file['id']} ({file['rows']} rows)", file=sys.stderr)

    with _client(args) as client:
        if args.quote:
            print(json.dumps(client.quote(args.job), indent=2))
            return 0
        job = client.submit(args.job, on_upload=uploaded)
        print(job["id"])
        print(f"submitted {job['name']} as {job['id']} ({job['status']})", file=sys.stderr)
        if not args.wait:
            return 0
        job = client.wait(job["id"], progress=True)
        _print_job(job)
        return 0 if job["status"] == "succeeded" else 1 if job["status"] in TERMINAL else 2


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.job_id is None:
            for job in client.list_jobs(limit=50):
                print(f"{job['id']}  {job['status']:<16} {job['name']}")
            return 0
        job = client.get(args.job_id)
        if args.json:
            print(json.dumps(job, indent=2))
        else:
            _print_job(job)
        return 0


def _print_job(job: dict[str, Any]) -> None:
    print(f"{job['id']}  {job['name']}  {job['status']}")
    if job.get("error"):
        print(f"  error: {job['error']['message']}")
    result = job.get("result") or {}
    for label, key in (
        ("base val", "base_val_score"),
        ("best val", "best_val_score"),
        ("base test", "base_test_score"),
        ("test", "test_score"),
    ):
        if result.get(key) is not None:
            print(f"  {label:<10} {result[key]:.4f}")
    if result.get("best_epoch") is not None:
        print(f"  best epoch {result['best_epoch']}; adapters: {', '.join(result['adapters'])}")
    elif job["status"] == "succeeded":
        print(f"  no epoch beat the base system ({result.get('stop_reason') or 'no adapters'})")


def cmd_logs(args: argparse.Namespace) -> int:
    from cotune.client import print_event

    with _client(args) as client:
        for event in client.events(args.job_id, follow=args.follow):
            print_event(event)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(args.job_id)
    print(f"{job['id']}  {job['status']}" + ("  (cancel requested)" * job["cancel_requested"]))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.component:
            path = client.download_adapter(
                args.job_id, args.component, _tar_path(args, args.component), extract=not args.tar
            )
        else:
            path = client.download_bundle(
                args.job_id, _tar_path(args, "bundle"), extract=not args.tar
            )
    print(path)
    return 0


def _tar_path(args: argparse.Namespace, what: str) -> Path:
    out: Path = args.out
    return out / f"{args.job_id}-{what}.tar.gz" if args.tar else out


def cmd_demo(args: argparse.Namespace) -> int:
    from cotune.embedded import demo

    return demo(tiny=args.tiny, out=args.out, verbose=args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
