"""OpenAI-style job creation over the official ``openai`` SDK, against a live server on real
PostgreSQL whose real ``ThreadDispatcher`` runs the jobs: the tiny model served by vLLM,
trained by TRL (``cotune/openai_jobs.py``). A supervised job is created, run and finished, its
adapter downloaded and loaded in peft; a dpo job is created and run on preference rows; bad
bodies and files answer 422 naming the field."""

from __future__ import annotations

import io
import json
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from live_api import running_api

from cotune.jobs.threads import ThreadDispatcher

COLORS = {"sami": "red", "lomi": "blue", "kazu": "green", "reta": "gold"}


def chat_rows(n_turns: int = 1) -> bytes:
    rows = []
    for name, color in COLORS.items():
        messages: list[dict[str, Any]] = [{"role": "system", "content": "Answer briefly."}]
        for _ in range(n_turns):
            messages += [
                {"role": "user", "content": f"what is the color of {name}?"},
                {"role": "assistant", "content": color},
            ]
        rows.append({"messages": messages})
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def preference_rows() -> bytes:
    rows = [
        {
            "input": {"messages": [{"role": "user", "content": f"what is the color of {name}?"}]},
            "preferred_output": [{"role": "assistant", "content": color}],
            "non_preferred_output": [{"role": "assistant", "content": "i do not know"}],
        }
        for name, color in COLORS.items()
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@dataclass
class Live:
    url: str
    key: str
    dispatcher: ThreadDispatcher

    def client(self) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0)


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The API with the real ``ThreadDispatcher`` behind uvicorn; ``tiny`` in the models cache
    is the real tiny model."""
    import uvicorn

    root = tmp_path_factory.mktemp("openai-jobs")
    with running_api(root, tiny_model_dir, "cotune_openai") as api:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = uvicorn.Config(api.app, host="127.0.0.1", port=port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        try:
            yield Live(url=f"http://127.0.0.1:{port}", key=api.key, dispatcher=api.dispatcher)
        finally:
            server.should_exit = True
            thread.join(10)


def upload(client: Any, name: str, content: bytes) -> str:
    created = client.files.create(file=(name, content), purpose="fine-tune")
    assert created.purpose == "fine-tune" and created.status == "processed"
    return str(created.id)


def wait_done(live: Live, client: Any, job_id: str) -> Any:
    assert live.dispatcher.wait_idle(timeout=900), "the job did not finish"
    return client.fine_tuning.jobs.retrieve(job_id)


def lora_delta(base_dir: Path, adapter_dir: Path) -> float:
    """The largest change the adapter makes to any base weight, once merged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return max((merged.state_dict()[k] - v).abs().max().item() for k, v in before.items())


def test_a_supervised_job_created_over_the_sdk_trains_and_downloads(
    live: Live, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import httpx
    from openai.types.fine_tuning import FineTuningJob

    client = live.client()
    train = upload(client, "train.jsonl", chat_rows(n_turns=2))
    val = upload(client, "val.jsonl", chat_rows())
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train,
        validation_file=val,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
        suffix="colors",
        seed=7,
    )
    assert isinstance(job, FineTuningJob) and job.training_file == train
    assert job.validation_file == val and job.seed == 7 and job.model == "tiny"
    done = wait_done(live, client, job.id)
    assert done.status == "succeeded", done
    assert done.fine_tuned_model == f"tiny-colors:{job.id}"
    assert done.hyperparameters.n_epochs == 1
    assert done.method is not None and done.method.type == "supervised"
    assert job.id in [j.id for j in client.fine_tuning.jobs.list()]
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    # two assistant turns a conversation, four conversations: eight given rows
    assert any("'samples': 8" in m and "train split's own outputs" in m for m in events), events

    response = httpx.get(
        f"{live.url}/v1/fine_tuning/jobs/{job.id}/adapters/assistant",
        headers={"Authorization": f"Bearer {live.key}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        archive.extractall(tmp_path, filter="data")
    adapter = next(p.parent for p in tmp_path.rglob("adapter_config.json"))
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert lora_delta(tiny_model_dir, adapter) > 0
    bundle = httpx.get(
        f"{live.url}/v1/jobs/{job.id}/bundle",
        headers={"Authorization": f"Bearer {live.key}"},
        timeout=60,
    )
    assert bundle.status_code == 200, bundle.text


def test_a_dpo_job_trains_on_preference_rows(live: Live) -> None:
    import httpx

    client = live.client()
    train = upload(client, "prefs.jsonl", preference_rows())
    val = upload(client, "prefs-val.jsonl", preference_rows())
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train,
        validation_file=val,
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "beta": 0.2}}},
    )
    assert job.status in ("validating_files", "queued", "running")
    assert job.method is not None and job.method.type == "dpo"
    assert job.method.dpo is not None and job.method.dpo.hyperparameters is not None
    assert job.method.dpo.hyperparameters.beta == 0.2
    done = wait_done(live, client, job.id)
    assert done.status == "succeeded", done
    response = httpx.get(
        f"{live.url}/v1/fine_tuning/jobs/{job.id}/components",
        headers={"Authorization": f"Bearer {live.key}"},
        timeout=60,
    )
    (component,) = response.json()["data"]
    (epoch,) = component["epochs"]
    assert component["id"] == "assistant" and epoch["pairs"] == len(COLORS), component
    assert epoch["samples"] == len(COLORS) and epoch["dpo_losses"], epoch


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "gpt-4o-mini"}, "model"),
        ({"validation_file": None}, "validation_file"),
        ({"method": {"type": "dpo"}}, "training_file"),  # a chat file for a dpo job
        ({"method": {"type": "reinforcement"}}, "method.type"),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
            "method.supervised.hyperparameters.n_epochs",
        ),
        ({"hyperparameters": {"learning_rate_multiplier": 1e6}}, "hyperparameters"),
        ({"suffix": "has space"}, "suffix"),
        ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations"),
    ],
)
def test_a_bad_create_body_answers_422_naming_the_field(
    live: Live, body: dict[str, Any], param: str
) -> None:
    import openai

    client = live.client()
    chat = upload(client, "chat.jsonl", chat_rows())
    given = {"model": "tiny", "training_file": chat, "validation_file": chat, **body}
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.fine_tuning.jobs.create(**given)
    assert refused.value.code == "invalid_spec"
    assert str(refused.value.param).startswith(param), refused.value.message


@pytest.mark.parametrize(
    ("row", "param"),
    [
        ({"messages": [{"role": "user", "content": "q"}]}, "line 2.messages"),
        ({"messages": [{"role": "user", "content": 3}]}, "line 2.messages.0.content"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "line 2.messages.0.role"),
        (
            {"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": []},
            "line 2.preferred_output",
        ),
    ],
)
def test_a_bad_fine_tune_file_answers_422_naming_line_and_field(
    live: Live, row: dict[str, Any], param: str
) -> None:
    import openai

    good = chat_rows().splitlines()[0] + b"\n"
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        live.client().files.create(
            file=("bad.jsonl", good + json.dumps(row).encode() + b"\n"), purpose="fine-tune"
        )
    assert refused.value.param == param, refused.value.message
