"""The transformers engine in-process and the OpenAI-compatible engine against a real vLLM server.

Both run the tiny model; the adapter is a real PEFT LoRA with random non-zero ``lora_B`` so it
changes what the model says. The vLLM server is started once for this module on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from doubles import SERVER_START_SECONDS

from cotune.engines.base import GenerationRequest, InferenceEngine
from cotune.engines.openai import OpenAIEngine
from cotune.engines.transformers import TransformersEngine
from cotune.engines.vllm import model_context_length, on_gpu
from cotune.errors import EngineError
from cotune.tiny import ANSWER_PROMPT, QUERY_PROMPT, make_world

API_KEY = "sk-secret-test"


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def tiny_prompts() -> list[str]:
    """Prompts of very different lengths in the formats the tiny model was trained on."""
    world = make_world()
    keys = sorted(world.facts)[:4]
    passages = "\n".join(
        f"{i + 1}. the color of {k} is {world.facts[k]}." for i, k in enumerate(keys[:3])
    )
    return [
        QUERY_PROMPT.format(question=world.question(keys[0])),
        ANSWER_PROMPT.format(passages=passages, question=world.question(keys[1])),
        "hi",
        QUERY_PROMPT.format(question=world.question(keys[3])),
        ANSWER_PROMPT.format(passages=passages.split("\n")[0], question=world.question(keys[0])),
    ]


def greedy(prompts: list[str], max_tokens: int = 12) -> list[GenerationRequest]:
    return [GenerationRequest(messages=chat(p), max_tokens=max_tokens) for p in prompts]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir: Path) -> TransformersEngine:
    return TransformersEngine(tiny_model_dir, batch_size=4)


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A real PEFT LoRA (r=8, all linear layers) whose lora_B is random, so it is not a no-op."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "lora", seed=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class VLLMServer:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def vllm_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VLLMServer]:
    """``python -m vllm.entrypoints.openai.api_server`` on the tiny model, LoRA at run time."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = dict(os.environ)
    env["VLLM_LOGGING_LEVEL"] = "INFO"  # the test reads the server's log
    env.update(
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        VLLM_CPU_KVCACHE_SPACE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    # The API server always runs its engine core in a process of its own; this variable (set
    # by conftest for the in-process engine) changes nothing there, so leave the default.
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_model_dir),
        "--host", "127.0.0.1", "--port", str(port),
        "--api-key", API_KEY,
        "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
        "--dtype", "float32",
        "--max-model-len", str(min(2048, model_context_length(str(tiny_model_dir)))),
        "--no-enable-prefix-caching", "--seed", "0",
        # Per server, not per request, in vLLM 0.32: no free whitespace inside JSON output.
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = VLLMServer(f"http://127.0.0.1:{port}/v1", process, log)
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"the vLLM server exited with {process.returncode}:\n"
                    f"{server.log_text()[-3000:]}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the vLLM server was not healthy after {SERVER_START_SECONDS} s:\n"
                    f"{server.log_text()[-3000:]}"
                )
            time.sleep(1)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture(scope="module")
def api_engine(vllm_server: VLLMServer, tiny_model_dir: Path) -> Iterator[OpenAIEngine]:
    engine = OpenAIEngine(
        model=str(tiny_model_dir), url=vllm_server.url, api_key=API_KEY, concurrency=4
    )
    yield engine
    engine.close()


# -- transformers -----------------------------------------------------------------------------


def test_transformers_meets_the_protocol(hf_engine: TransformersEngine) -> None:
    assert isinstance(hf_engine, InferenceEngine)
    assert hf_engine.kind == "transformers"
    assert not hf_engine.supports_json_schema()
    assert hf_engine.generate([]) == []


def test_transformers_batch_equals_one_at_a_time(hf_engine: TransformersEngine) -> None:
    prompts = tiny_prompts()
    before = hf_engine.stats.requests
    batched = hf_engine.generate(greedy(prompts))  # batch_size 4: two batches, left padded
    singles = [hf_engine.generate(greedy([p]))[0] for p in prompts]
    assert [r.text for r in batched] == [r.text for r in singles]
    assert [r.completion_tokens for r in batched] == [r.completion_tokens for r in singles]
    assert [r.prompt_tokens for r in batched] == [r.prompt_tokens for r in singles]
    assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 for r in batched)
    assert len({r.prompt_tokens for r in batched}) > 2  # really different lengths
    assert any(r.text.strip() for r in batched)
    assert hf_engine.stats.requests - before == 2 * len(prompts)


def test_transformers_limits_and_stops(hf_engine: TransformersEngine) -> None:
    prompt = tiny_prompts()[2]
    long, short = hf_engine.generate(greedy([prompt], 12) + greedy([prompt], 1))
    assert short.completion_tokens == 1 and short.finish_reason == "length"
    if long.finish_reason == "stop":  # the eos token counts, its text does not
        assert "<|im_end|>" not in long.text


def test_transformers_seeded_sampling_is_reproducible(hf_engine: TransformersEngine) -> None:
    request = GenerationRequest(messages=chat("hi"), max_tokens=12, temperature=1.0, seed=7)
    first = hf_engine.generate([request, request])
    again = hf_engine.generate([request])
    assert first[0].text == first[1].text == again[0].text


def test_transformers_json_schema_request_generates_unconstrained(
    hf_engine: TransformersEngine,
) -> None:
    request = GenerationRequest(messages=chat("hi"), max_tokens=8, json_schema={"type": "object"})
    (result,) = hf_engine.generate([request])
    assert result.completion_tokens > 0  # generated normally; the judge validates downstream


def test_transformers_adapter_changes_output_and_base_stays_base(
    hf_engine: TransformersEngine, adapter_dir: Path
) -> None:
    requests = greedy(tiny_prompts())
    base = [r.text for r in hf_engine.generate(requests)]
    tuned = [r.text for r in hf_engine.generate(requests, adapter=str(adapter_dir))]
    assert tuned != base
    assert [r.text for r in hf_engine.generate(requests)] == base
    assert [r.text for r in hf_engine.generate(requests, adapter=str(adapter_dir))] == tuned
    assert hf_engine.stats.adapters_loaded.count(str(adapter_dir.resolve())) == 1


def test_transformers_reloads_an_adapter_retrained_in_place(
    hf_engine: TransformersEngine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = make_adapter(tiny_model_dir, tmp_path / "lora", seed=1)
    requests = greedy(tiny_prompts())
    first = [r.text for r in hf_engine.generate(requests, adapter=str(folder))]
    shutil.rmtree(folder)
    make_adapter(tiny_model_dir, folder, seed=2)
    second = [r.text for r in hf_engine.generate(requests, adapter=str(folder))]
    assert second != first
    assert hf_engine.stats.adapters_loaded.count(str(folder.resolve())) == 2
    assert len([k for k in hf_engine._adapters if k[0] == str(folder.resolve())]) == 1


# -- stepping aside for a trainer (DESIGN.md §7) --------------------------------------------


def test_vllm_cpu_engine_released_and_reacquired_serves_the_same(
    tiny_model_dir: Path, adapter_dir: Path, vllm_engine: Any
) -> None:
    """With ``release_on_cpu`` the engine is shut down and started again: the same greedy
    outputs, base and adapter, and the adapter still counted as loaded once. The process's
    other engine keeps working meanwhile (vLLM's own shutdown tears down state they share)."""
    from cotune.engines.vllm import VLLMEngine, VLLMSettings

    engine = VLLMEngine(tiny_model_dir, VLLMSettings(max_lora_rank=16, release_on_cpu=True))
    try:
        requests = greedy(tiny_prompts())
        base = [r.text for r in engine.generate(requests)]
        tuned = [r.text for r in engine.generate(requests, adapter=str(adapter_dir))]
        assert tuned != base

        other = [r.text for r in vllm_engine.generate(requests)]
        engine.release()
        engine.release()  # idempotent
        assert engine.released and engine.llm is None
        assert [r.text for r in vllm_engine.generate(requests)] == other
        engine.reacquire()
        engine.reacquire()  # idempotent
        assert not engine.released and engine.llm is not None

        assert [r.text for r in engine.generate(requests)] == base
        assert [r.text for r in engine.generate(requests, adapter=str(adapter_dir))] == tuned
        assert engine.stats.adapters_loaded == [str(adapter_dir.resolve())]

        engine.release()  # a released engine asked to generate comes back by itself
        assert [r.text for r in engine.generate(requests, adapter=str(adapter_dir))] == tuned
        assert not engine.released
    finally:
        engine.release()  # frees its memory for the rest of the session


def test_vllm_cpu_engine_stays_loaded_by_default(vllm_engine: Any) -> None:
    llm = vllm_engine.llm
    try:
        vllm_engine.release()
        assert vllm_engine.released and vllm_engine.llm is llm
    finally:
        vllm_engine.reacquire()
    assert not vllm_engine.released and vllm_engine.llm is llm


def test_stepped_aside_releases_every_cached_engine_and_brings_them_back(
    vllm_engine: Any,
) -> None:
    from cotune.engines import cached_engines, stepped_aside

    assert vllm_engine in cached_engines()
    with stepped_aside() as switch:
        assert all(engine.released for engine in cached_engines())
    assert not any(engine.released for engine in cached_engines())
    assert switch.release_seconds >= 0 and switch.reacquire_seconds >= 0


def test_transformers_engine_released_on_cpu_keeps_its_model(
    hf_engine: TransformersEngine, adapter_dir: Path
) -> None:
    requests = greedy(tiny_prompts()[:2])
    tuned = [r.text for r in hf_engine.generate(requests, adapter=str(adapter_dir))]
    hf_engine.release()
    assert hf_engine.released
    assert [r.text for r in hf_engine.generate(requests, adapter=str(adapter_dir))] == tuned
    assert not hf_engine.released


def test_the_switch_benchmark_prints_its_table(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import engine_switch
    finally:
        sys.path.pop(0)
    assert engine_switch.main(["--model", str(tiny_model_dir), "--cycles", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    modes = {row.split("|")[1].strip(): row for row in rows[2:]}
    released = "sleep" if on_gpu() else "release"
    assert set(modes) == ({"sleep"} if on_gpu() else {"stay", "release"})
    assert float(modes[released].strip("|").split("|")[-1]) > 0  # memory given back


# -- OpenAI-compatible, against a real vLLM server --------------------------------------------


def test_openai_batch_in_order_and_equal_to_transformers(
    api_engine: OpenAIEngine, hf_engine: TransformersEngine
) -> None:
    assert isinstance(api_engine, InferenceEngine)
    assert api_engine.supports_json_schema()
    prompts = tiny_prompts()
    batch = api_engine.generate(greedy(prompts))
    singles = [api_engine.generate(greedy([p]))[0] for p in prompts]
    assert [r.text for r in batch] == [r.text for r in singles]
    assert [r.prompt_tokens for r in batch] == [r.prompt_tokens for r in singles]
    assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 for r in batch)
    # Greedy on fp32 and a tiny model: vLLM-CPU and HF agree token for token.
    local = hf_engine.generate(greedy(prompts))
    assert [r.text for r in batch] == [r.text for r in local]
    assert [r.prompt_tokens for r in batch] == [r.prompt_tokens for r in local]
    assert [r.completion_tokens for r in batch] == [r.completion_tokens for r in local]
    assert api_engine.stats.requests >= 2 * len(prompts)


def test_openai_adapter_loaded_once_and_changes_output(
    api_engine: OpenAIEngine, vllm_server: VLLMServer, adapter_dir: Path
) -> None:
    requests = greedy(tiny_prompts())
    base = [r.text for r in api_engine.generate(requests)]
    tuned = [r.text for r in api_engine.generate(requests, adapter=str(adapter_dir))]
    again = [r.text for r in api_engine.generate(requests, adapter=str(adapter_dir))]
    assert tuned != base
    assert again == tuned
    assert [r.text for r in api_engine.generate(requests)] == base
    assert api_engine.stats.adapters_loaded == [str(adapter_dir.resolve())]
    assert vllm_server.log_text().count("Loaded new LoRA adapter") == 1
    served = httpx.get(f"{vllm_server.url}/models", headers={"Authorization": f"Bearer {API_KEY}"})
    names = [m["id"] for m in served.json()["data"]]
    assert sum(name.startswith("cotune-lora-") for name in names) == 1


def test_openai_adapter_load_is_idempotent_across_engines(
    vllm_server: VLLMServer, tiny_model_dir: Path, adapter_dir: Path
) -> None:
    # A second engine (another process, a restarted worker) asks the server to load it again.
    other = OpenAIEngine(model=str(tiny_model_dir), url=vllm_server.url, api_key=API_KEY)
    try:
        (result,) = other.generate(greedy(tiny_prompts()[:1]), adapter=str(adapter_dir))
    finally:
        other.close()
    assert result.completion_tokens > 0


def test_openai_json_schema_output_parses(api_engine: OpenAIEngine) -> None:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "blame": {"type": "string", "enum": ["query", "search", "answer"]},
            "ok": {"type": "boolean"},
        },
        "required": ["blame", "ok"],
        "additionalProperties": False,
    }
    request = GenerationRequest(
        messages=chat("Judge JSON: blame critique"), max_tokens=40, json_schema=schema
    )
    (result,) = api_engine.generate([request])
    data = json.loads(result.text)
    assert data["blame"] in {"query", "search", "answer"} and isinstance(data["ok"], bool)


def test_openai_key_from_environment(
    vllm_server: VLLMServer, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COTUNE_TEST_VLLM_KEY", API_KEY)
    engine = OpenAIEngine(
        model=str(tiny_model_dir), url=vllm_server.url, api_key_env="COTUNE_TEST_VLLM_KEY"
    )
    try:
        (result,) = engine.generate(greedy(["hi"], 4))
    finally:
        engine.close()
    assert result.completion_tokens > 0
    monkeypatch.delenv("COTUNE_TEST_VLLM_KEY")
    with pytest.raises(EngineError, match="COTUNE_TEST_VLLM_KEY"):
        OpenAIEngine(model="m", url=vllm_server.url, api_key_env="COTUNE_TEST_VLLM_KEY")


def test_openai_http_errors_name_the_url_and_status_not_the_key(
    vllm_server: VLLMServer, tiny_model_dir: Path
) -> None:
    wrong_key = OpenAIEngine(
        model=str(tiny_model_dir), url=vllm_server.url, api_key="sk-wrong-key-test"
    )
    try:
        with pytest.raises(EngineError) as caught:
            wrong_key.generate(greedy(["hi"], 4))
    finally:
        wrong_key.close()
    message = str(caught.value)
    assert "401" in message and vllm_server.url in message
    assert "sk-wrong-key-test" not in message


def test_openai_wrong_port_raises_after_retries_without_the_key() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    engine = OpenAIEngine(
        model="tiny", url=url, api_key=API_KEY, max_retries=2, backoff=0.05, timeout=5
    )
    try:
        with pytest.raises(EngineError) as caught:
            engine.generate(greedy(["hi", "hello"], 4))
    finally:
        engine.close()
    message = str(caught.value)
    assert url in message and "3 attempts" in message
    assert API_KEY not in message and API_KEY not in repr(engine)
    assert API_KEY not in repr(caught.value.__cause__ or "")


def test_transformers_engine_runs_the_same_system(
    hf_engine: TransformersEngine, tiny_example: Path, vllm_engine: Any
) -> None:
    """The tiny-kb system on HF generate: same spans, and greedy outputs equal vLLM's."""
    from cotune.data import load_examples
    from cotune.runtime import Runtime, mean_score, score_traces
    from cotune.spec import load_system
    from cotune.tools import ToolContext

    system = load_system(tiny_example / "system.yaml")
    examples = load_examples(tiny_example / "val.jsonl", system)[:8]
    tools = ToolContext.for_system(system)
    hf_traces = Runtime(system, {"tiny": hf_engine}, tools).run(examples)
    vllm_traces = Runtime(system, {"tiny": vllm_engine}, tools).run(examples)
    score_traces(system, hf_traces)
    assert [[s.component for s in t.spans] for t in hf_traces] == [
        ["query", "search", "answer"]
    ] * 8
    assert all(t.spans[0].model == hf_engine.model_id for t in hf_traces)
    assert 0.0 <= mean_score(hf_traces) <= 1.0
    assert [t.output for t in hf_traces] == [t.output for t in vllm_traces]


def test_an_engine_starts_with_flask_loaded_in_the_process() -> None:
    """vllm-cpu's start walks every loaded module's globals with ``hasattr``; Flask's
    ``current_app`` (moto's S3 server loads Flask) raised RuntimeError there, so no engine
    could start in a process that had loaded Flask. The walk itself, over every module now
    loaded (this test's process has Flask), must pass."""
    import flask
    from vllm.triton_utils import dispatcher

    from cotune.engines.vllm import _module_walk_workarounds

    with pytest.raises(RuntimeError):
        hasattr(flask.current_app, "__dict__")  # what the walk met
    _module_walk_workarounds()
    dispatcher._rebind_kernels([])
