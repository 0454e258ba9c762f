"""Kill workers mid-stage and measure recovery, with the default lease and reaper settings.

    python scripts/chaos.py --kills 3 --seed 0            # a few minutes on 2 cores
    python scripts/chaos.py --kills 20 --epochs 2         # the long form

What it does: a fresh PostgreSQL database (``COTUNE_TEST_PG_URL`` or the local one), its own
Redis key prefix, Celery beat (the reaper) and two workers, as a small fleet runs. It submits
the tiny kb-qa job (the tiny model is prepared first), and, at seeded points, SIGKILLs the
worker that holds the running stage (its whole process group) and starts a replacement. For each
kill it measures the recovery: seconds from the kill until another worker holds the stage.
At the end it checks that the job succeeded, that every stage is done once (``attempts`` counts
the takeovers), that no stage's events were written twice, and that the adapters equal those
of the same job run without kills (``cotune run``, same seeds), and prints a table. Nothing
here is asserted by the test suite: the numbers go to docs/reliability.md with the command.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from fleet import PROCESS_ENV, Fleet, fleet_env, holder_pid, pg_database  # noqa: E402

JOB: dict[str, Any] = {
    "system": "system.yaml",
    "data": {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"},
    "loop": {"epochs": 2, "rollout_batch": 16, "samples_per_component": 24, "seed": 0},
    "train": {"epochs": 2, "batch_size": 8, "learning_rate": 5.0e-3, "lora_r": 8, "lora_alpha": 16},
}


def run(args: argparse.Namespace) -> int:
    from celery import Celery

    from cotune.embedded import run_embedded
    from cotune.jobs.materialize import local_spec
    from cotune.jobs.queues import ADVANCE_JOB, GPU_QUEUE, message_conf
    from cotune.models import prepare_model
    from cotune.records import EPOCH_STAGES
    from cotune.settings import Settings
    from cotune.spec.job import parse_job
    from cotune.store import ArtifactStore, JobStore, StageStatus
    from cotune.tiny import write_tiny_example

    os.environ.update(PROCESS_ENV)  # the uninterrupted run, in this process, as the workers
    import torch

    torch.set_num_threads(2)
    rng = random.Random(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="cotune-chaos-"))
    model = prepare_model("tiny", progress=print)
    example = write_tiny_example(folder / "tiny-kb", model_path=str(model))
    spec = {**JOB, "loop": {**JOB["loop"], "epochs": args.epochs}}
    job = parse_job(spec, base_dir=example)
    url = pg_database(args.pg)
    defaults = Settings()
    env = fleet_env(url, args.redis, folder)
    store = JobStore(url)
    fleet = Fleet(env, folder)
    client = Celery("chaos")
    client.conf.update(
        **message_conf(
            Settings(
                broker_url=args.redis,
                broker_key_prefix=env["COTUNE_BROKER_KEY_PREFIX"],
                database_url=url,
            )
        )
    )
    fleet.beat()
    for _ in range(args.workers):
        fleet.worker()
    started = time.monotonic()
    job_id = store.create_job(job.system.name, local_spec(job))
    client.send_task(ADVANCE_JOB, args=[job_id], queue=GPU_QUEUE)
    kills: list[dict[str, Any]] = []
    # Seeded kill points spread over the job's stages (a stage may be hit more than once).
    order = [(0, "baseline")]
    order += [(e, s.value) for e in range(1, args.epochs + 1) for s in EPOCH_STAGES]
    order += [(args.epochs + 1, "test")]
    targets = sorted(rng.choices(order, k=args.kills), key=order.index)
    try:
        while len(kills) < args.kills:
            record = store.get_job(job_id)
            if record is None or record.status.value in ("succeeded", "failed", "cancelled"):
                break
            running = [
                s
                for s in store.stage_states(job_id)
                if s.status == StageStatus.running
                and holder_pid(s.lease_owner) in fleet.procs
                and (s.epoch, s.stage.value) in targets[len(kills) :]
            ]
            if not running:
                time.sleep(0.2)
                continue
            stage = running[0]
            time.sleep(rng.uniform(0.0, args.max_delay))  # a seeded point within the stage
            now = store.stage(job_id, stage.epoch, stage.stage)
            pid = holder_pid(now.lease_owner if now else None)
            if now is None or now.status != StageStatus.running or pid not in fleet.procs:
                continue  # it finished meanwhile: pick the next
            killed_at = time.monotonic()
            fleet.kill(pid)
            fleet.worker()  # the fleet's size is kept; recovery needs no particular worker
            while True:
                after = store.stage(job_id, stage.epoch, stage.stage)
                if after is not None and (
                    after.status == StageStatus.done or after.lease_owner != now.lease_owner
                ):
                    break
                if time.monotonic() - killed_at > args.timeout:
                    raise SystemExit(f"no recovery within {args.timeout} s of kill {len(kills)}")
                time.sleep(0.2)
            kills.append(
                {
                    "stage": f"epoch {stage.epoch} {stage.stage.value}",
                    "recovery": time.monotonic() - killed_at,
                }
            )
            print(f"kill {len(kills)}: {kills[-1]['stage']}, recovered in "
                  f"{kills[-1]['recovery']:.1f} s", flush=True)  # fmt: skip
        while True:
            record = store.get_job(job_id)
            if record is not None and record.status.value in ("succeeded", "failed", "cancelled"):
                break
            if time.monotonic() - started > args.timeout * (args.kills + 10):
                raise SystemExit("the job did not finish")
            time.sleep(1)
        wall = time.monotonic() - started
    finally:
        fleet.stop()
    states = store.stage_states(job_id)
    events = [e.message for e in store.events(job_id, limit=10_000)]
    repeated = [m for m, n in collections.Counter(events).items() if n > 1 and "re-queued" not in m]
    clean = run_embedded(job, folder / "uninterrupted", progress=False)
    diff = adapter_difference(ArtifactStore(str(folder / "artifacts")), record, clean)
    report(args, defaults, kills, record, wall, states, repeated, diff)
    store.close()
    ok = record.status.value == "succeeded" and not repeated and diff is not None and diff <= 1e-5
    return 0 if ok else 1


def report(
    args: argparse.Namespace,
    defaults: Any,
    kills: list[dict[str, Any]],
    record: Any,
    wall: float,
    states: list[Any],
    repeated: list[str],
    diff: float | None,
) -> None:
    recoveries = [k["recovery"] for k in kills]
    attempts = sorted(collections.Counter(s.attempts for s in states).items())
    error = f" ({record.error})" if record.error else ""
    lines = [
        f"## chaos: {len(kills)} kills, seed {args.seed}, {args.epochs} epochs, "
        f"{args.workers} workers; defaults: lease {defaults.lease_seconds:.0f} s, "
        f"reaper {defaults.reaper_interval:.0f} s, bound {defaults.recovery_bound_seconds:.1f} s",
        "",
        "| kill | stage | recovery (s) |",
        "| --- | --- | --- |",
        *(f"| {i} | {k['stage']} | {k['recovery']:.1f} |" for i, k in enumerate(kills, 1)),
        "",
        f"- job: {record.status.value} in {wall:.0f} s{error}",
        f"- stages: {len(states)}, all done: {all(s.status == 'done' for s in states)}, "
        f"(attempts, stages): {attempts}",
        f"- events written twice: {repeated or 'none'}",
        f"- adapters against an uninterrupted run: max |difference| {diff}",
    ]
    if recoveries:
        median, worst = statistics.median(recoveries), max(recoveries)
        lines.insert(-4, f"- recovery: median {median:.1f} s, max {worst:.1f} s")
    print("\n".join(lines))


def adapter_difference(artifacts: Any, record: Any, clean: Any) -> float | None:
    """The largest difference between the chaos run's adapters and the uninterrupted run's."""
    from safetensors.numpy import load_file

    adapters = (record.result or {}).get("adapters") or {}
    if set(adapters) != set(clean.adapters):
        return None
    worst = 0.0
    for component, key in adapters.items():
        ours = load_file(str(artifacts.local_path(key) / "adapter_model.safetensors"))
        theirs = load_file(str(Path(clean.adapters[component]) / "adapter_model.safetensors"))
        if ours.keys() != theirs.keys():
            return None
        worst = max(worst, *(float(abs(ours[n] - theirs[n]).max()) for n in ours))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-delay", type=float, default=3.0, help="seconds into a stage")
    parser.add_argument("--timeout", type=float, default=240.0, help="per kill")
    parser.add_argument(
        "--pg",
        default=os.environ.get(
            "COTUNE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
