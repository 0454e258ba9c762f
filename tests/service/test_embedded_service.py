"""``cotune serve --embedded`` end to end: the API and its jobs in one process on SQLite, with no
Redis and no Celery worker; the same job, CLI and downloads as the Celery path in
test_workers.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

from e2e import PROCESS_ENV, check_downloads, cli, serving, start_api, stop, write_job_folder


def test_embedded_server_runs_the_cli_job(tiny_model_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / "tiny").symlink_to(tiny_model_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COTUNE_", "CELERY_"))} | {
        "COTUNE_HOME": str(home),
        "COTUNE_DATABASE_URL": f"sqlite:///{tmp_path / 'cotune.db'}",
        "COTUNE_ARTIFACTS": str(tmp_path / "artifacts"),
        "COTUNE_WORKDIR": str(tmp_path / "work"),
        **PROCESS_ENV,
    }
    created = json.loads(cli(env, "keys", "create", "--tenant", "acme"))
    server, url = start_api(env, tmp_path / "api.log", "--embedded")
    try:
        client_env = {**env, "COTUNE_API_URL": url, "COTUNE_API_KEY": created["key"]}
        job_file = write_job_folder(tmp_path / "job")
        out = cli(client_env, "submit", str(job_file), "--wait", timeout=900)
        lines = out.splitlines()
        job_id = lines[0]
        assert "files validated; queued" in out, out
        assert f"{job_id}  tiny-kb  succeeded" in out, out + (tmp_path / "api.log").read_text()
        assert "best epoch 1" in out, out
        status = json.loads(cli(client_env, "status", job_id, "--json"))
        assert status["status"] == "succeeded" and status["organization_id"] == "acme"
        check_downloads(env, url, created["key"], job_id, tmp_path / "downloads")
    finally:
        stop(server)

    # The downloaded bundle serves the trained system: one chat request per component's
    # adapter (and the base model) answers 200.
    import httpx

    bundle = next((tmp_path / "downloads" / "cli").iterdir())
    with serving(bundle, env, tmp_path / "serve.log") as v1:
        served = {m["id"] for m in httpx.get(f"{v1}/models", timeout=10).json()["data"]}
        assert served == {"tiny", "query", "answer"}
        for model in sorted(served):
            response = httpx.post(
                f"{v1}/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": "what is the color of sami?"}],
                    "max_tokens": 8,
                    "temperature": 0,
                },
                timeout=120,
            )
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] > 0
    log = (tmp_path / "api.log").read_text()
    assert created["key"] not in log  # the key is never logged
