"""Registered models for real: ``cotune models add`` from a local folder, a GGUF file and a
Hugging Face hub cache (offline), each then run by the tiny-kb system; what is refused (remote
code, pickled weights, a model an unfinished job names) and why.

The tiny model is the weights in all three (the GGUF is written by ``tests/tiny_gguf.py`` with
the ``gguf`` package's writer), so each registered copy must answer exactly as the original.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tiny_gguf import write_hub_cache, write_llama_gguf

from cotune.cli import main
from cotune.errors import SpecError
from cotune.model_records import ModelOptions, ModelStatus
from cotune.model_registry import ModelInUse, add_model, catalog, remove_model
from cotune.models import MANIFEST, ModelNotPreparedError, models_dir, resolve_model
from cotune.settings import get_settings
from cotune.spec import ModelRef, parse_system
from cotune.store import JobStatus, JobStore
from cotune.store.registry import ModelStore
from cotune.tiny import write_tiny_example

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[JobStore]:
    """``COTUNE_HOME`` and the settings' database (what ``cotune models`` uses) in tmp_path."""
    url = f"sqlite:///{tmp_path / 'cotune.db'}"
    monkeypatch.setenv("COTUNE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COTUNE_DATABASE_URL", url)
    get_settings.cache_clear()
    with JobStore(url, auto_migrate=True) as store:
        yield store
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_example(tmp_path_factory.mktemp("tiny-kb"), splits=(4, 6, 4))


def answers(example: Path, model: dict[str, str]) -> list[Any]:
    """The tiny-kb system's outputs on val with ``model`` as its base (transformers engine)."""
    from cotune.data import load_examples
    from cotune.runtime import open_runtime

    data = yaml.safe_load((example / "system.yaml").read_text())
    data["models"] = {"tiny": model}
    system = parse_system(data, base_dir=example)
    runtime = open_runtime(system, engine="transformers")
    return [t.output for t in runtime.run(load_examples(example / "val.jsonl", system))]


def cli(*argv: str) -> int:
    return main(["models", *argv])


def test_add_a_folder_and_run_it(
    server: JobStore,
    tiny_model_dir: Path,
    example: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text((tiny_model_dir / "chat_template.jinja").read_text())
    assert cli("add", "mine", "--path", str(tiny_model_dir), "--chat-template", str(template),
               "--max-model-len", "512") == 0  # fmt: skip
    added = json.loads(capsys.readouterr().out)
    assert (added["kind"], added["status"]) == ("path", "ready")
    assert added["source"] == str(tiny_model_dir.resolve())

    folder = models_dir() / "mine"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["source"]["kind"] == "path"
    assert manifest["options"]["max_model_len"] == 512
    from cotune.engines.vllm import model_context_length

    assert model_context_length(str(folder)) == 512  # the registration caps the engine
    assert resolve_model(ModelRef(name="mine"), param="models.tiny") == folder

    assert answers(example, {"name": "mine"}) == answers(example, {"path": str(tiny_model_dir)})
    assert cli("list") == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"tiny", "smollm2-135m", "mine"} == {row["name"] for row in listed}
    assert next(r for r in listed if r["name"] == "mine")["status"] == "ready"


def test_add_a_gguf_and_run_it(
    server: JobStore, tiny_model_dir: Path, example: Path, tmp_path: Path
) -> None:
    gguf = write_llama_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    model = add_model(ModelStore(server), "tiny-gguf", "gguf", str(gguf), ModelOptions(),
                      progress=None)  # fmt: skip
    assert model.status == ModelStatus.ready
    manifest = json.loads((models_dir() / "tiny-gguf" / MANIFEST).read_text())
    assert manifest["source"]["kind"] == "gguf" and len(manifest["source"]["sha256"]) == 64
    assert answers(example, {"name": "tiny-gguf"}) == answers(
        example, {"path": str(tiny_model_dir)}
    )


def test_a_gguf_without_a_chat_template_needs_one_given(
    server: JobStore, tiny_model_dir: Path, example: Path, tmp_path: Path
) -> None:
    """A GGUF without a template got ChatML silently, and a model trained on another turn
    format (Gemma 3) then answered its own template's tokens: now it is refused until the
    admin gives one."""
    gguf = write_llama_gguf(tiny_model_dir, tmp_path / "bare.gguf", chat_template=False)
    store = ModelStore(server)
    with pytest.raises(SpecError) as refused:
        add_model(store, "bare", "gguf", str(gguf), ModelOptions(), progress=None)
    assert refused.value.param == "chat_template" and "--chat-template" in str(refused.value)
    failed = store.get("bare")
    assert failed is not None and failed.status == ModelStatus.failed
    store.delete("bare")
    template = (tiny_model_dir / "chat_template.jinja").read_text()
    model = add_model(store, "bare", "gguf", str(gguf), ModelOptions(chat_template=template),
                      progress=None)  # fmt: skip
    assert model.status == ModelStatus.ready
    assert answers(example, {"name": "bare"}) == answers(example, {"path": str(tiny_model_dir)})


def test_add_from_a_hub_cache_offline_pins_the_revision(
    server: JobStore, tiny_model_dir: Path, example: Path, tmp_path: Path
) -> None:
    """The real huggingface_hub code against a hub-layout cache, with HF_HUB_OFFLINE=1 (read
    when huggingface_hub is imported: hence a separate process, as `cotune models add` is)."""
    hub = tmp_path / "hub"
    write_hub_cache(tiny_model_dir, hub, "acme/tiny-chat", COMMIT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    command = [sys.executable, "-m", "cotune.cli", "models", "add", "hubby", "--hf",
               "acme/tiny-chat"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    model = ModelStore(server).get("hubby")
    assert model is not None and model.status == ModelStatus.ready
    assert model.source == f"acme/tiny-chat@{COMMIT}"  # "main" resolved and pinned
    assert answers(example, {"name": "hubby"}) == answers(example, {"path": str(tiny_model_dir)})

    command[-3:] = ["nothere", "--hf", "acme/missing"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 1 and "could not fetch 'acme/missing'" in done.stderr
    failed = ModelStore(server).get("nothere")
    assert failed is not None and failed.status == ModelStatus.failed and failed.error


def copy_of(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    return dest


def test_remote_code_is_refused(server: JobStore, tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(tiny_model_dir, tmp_path / "remote")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    store = ModelStore(server)
    with pytest.raises(SpecError) as info:
        add_model(store, "evil", "path", str(folder), ModelOptions(), progress=None)
    assert "auto_map" in info.value.message and "trust_remote_code" in info.value.message
    found = store.get("evil")
    assert found is not None and found.status == ModelStatus.failed
    assert not (models_dir() / "evil").exists()
    assert not [p for p in models_dir().iterdir() if p.name.startswith(".evil")]  # no staging


def test_pickled_weights_are_refused_and_never_copied(
    server: JobStore, tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = copy_of(tiny_model_dir, tmp_path / "pickled")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(SpecError) as info:
        add_model(ModelStore(server), "pickled", "path", str(folder), ModelOptions(), progress=None)
    assert "no safetensors weights" in info.value.message
    assert "pytorch_model.bin" in info.value.message

    (folder / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes())
    add_model(ModelStore(server), "pickled", "path", str(folder), ModelOptions(), progress=None)
    assert not (models_dir() / "pickled" / "pytorch_model.bin").exists()  # a retry replaces it


def test_remove_refuses_a_model_an_unfinished_job_names(
    server: JobStore, tiny_model_dir: Path
) -> None:
    store = ModelStore(server)
    add_model(store, "mine", "path", str(tiny_model_dir), ModelOptions(), progress=None)
    spec = {"system": {"models": {"tiny": {"name": "tiny"}}}, "judge": {"model": "mine"}}
    job_id = server.create_job("uses-mine", spec)
    with pytest.raises(ModelInUse) as info:
        remove_model(store, "mine")
    assert job_id in str(info.value)
    assert cli("remove", "mine") == 1  # the CLI says so too, and keeps the model
    assert store.get("mine") is not None and (models_dir() / "mine").is_dir()

    server.transition(job_id, JobStatus.cancelled)
    remove_model(store, "mine")
    assert store.get("mine") is None and not (models_dir() / "mine").exists()
    with pytest.raises(SpecError) as unknown:
        resolve_model(ModelRef(name="mine"), param="models.tiny")
    assert unknown.value.param == "models.tiny.name"


def test_resolve_names_a_model_that_is_not_ready(server: JobStore, tmp_path: Path) -> None:
    store = ModelStore(server)
    store.add("later", "hf", "acme/later", ModelOptions())
    store.set_status("later", ModelStatus.preparing)
    with pytest.raises(SpecError) as info:
        resolve_model(ModelRef(name="later"), param="models.m", registered=catalog(store))
    assert "registered but preparing" in info.value.message
    assert info.value.param == "models.m.name"
    store.set_status("later", ModelStatus.ready)  # a row says ready, the cache has nothing
    with pytest.raises(ModelNotPreparedError):
        resolve_model(ModelRef(name="later"), registered=catalog(store))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "tiny", "--path", "."], "built-in"),
        (["add", "a b", "--path", "."], "1-64 letters"),
        (["add", "x", "--hf", "not a repo"], "ORG/NAME[@REVISION]"),
        (["add", "x", "--path", ".", "--tensor-parallel", "0"], "--tensor-parallel"),
        (["remove", "tiny"], "built in"),
        (["remove", "nobody"], "no registered model 'nobody'"),
    ],
)
def test_cli_refusals_name_the_problem(
    server: JobStore, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(*argv) == 1
    assert message in capsys.readouterr().err


def test_a_job_trains_on_a_hub_and_a_gguf_registered_model(
    server: JobStore, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Each kind of registration used by a job: the query writer on a hub-cache model, the
    answer writer (and the judge) on a GGUF one, run by ``cotune run``'s code on the
    transformers engine (the vLLM path of registered models: ``tests/core/test_two_bases.py``)."""
    from cotune.embedded import run_embedded
    from cotune.spec.job import load_job

    hub = tmp_path / "hub"
    write_hub_cache(tiny_model_dir, hub, "acme/tiny-chat", COMMIT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    done = subprocess.run(
        [sys.executable, "-m", "cotune.cli", "models", "add", "hubby", "--hf", "acme/tiny-chat"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    gguf = write_llama_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    add_model(ModelStore(server), "tiny-gguf", "gguf", str(gguf), ModelOptions(), progress=None)

    folder = write_tiny_example(tmp_path / "job", splits=(12, 6, 6))
    system = yaml.safe_load((folder / "system.yaml").read_text())
    system["models"] = {"q": {"name": "hubby"}, "a": {"name": "tiny-gguf"}}
    system["components"][0]["model"], system["components"][2]["model"] = "q", "a"
    (folder / "system.yaml").write_text(yaml.safe_dump(system, sort_keys=False))
    (folder / "job.yaml").write_text(
        "system: system.yaml\n"
        "data: {train: train.jsonl, val: val.jsonl, test: test.jsonl}\n"
        "engine: transformers\n"
        "judge: {model: a, max_tokens: 128}\n"
        "loop: {epochs: 1, rollout_batch: 12, samples_per_component: 8, judge_samples: 1}\n"
        "train: {epochs: 1, batch_size: 4, lora_r: 4, lora_alpha: 8}\n"
    )
    report = run_embedded(load_job(folder / "job.yaml"), tmp_path / "run", progress=False)
    assert report.epochs, report
    for component, name in (("query", "hubby"), ("answer", "tiny-gguf")):
        adapter = Path(report.adapters[component])
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == name, config
