"""Shared fixtures: the tiny model (built once, cached on disk), its task, one vLLM engine.

Everything here is real: the tiny model is a trained Llama, the engine is vLLM in-process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("COTUNE_TEST_CACHE", REPO / ".cache" / "tests"))

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session", autouse=True)
def _cap_threads() -> None:
    import torch

    torch.set_num_threads(2)


def _builder_version() -> str:
    source = (REPO / "cotune" / "tiny.py").read_bytes()
    return hashlib.sha256(source).hexdigest()[:12]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny Llama trained on the tiny-kb format; rebuilt when cotune/tiny.py changes."""
    from cotune.tiny import build_tiny_model

    folder = CACHE / f"tiny-model-{_builder_version()}"
    if not (folder / "cotune_tiny.json").exists():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        build_tiny_model(partial)
        partial.rename(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_example(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-kb example folder (system.yaml, corpus, splits) pointing at the tiny model."""
    from cotune.tiny import write_tiny_example

    return write_tiny_example(tmp_path_factory.mktemp("tiny-kb"), model_path=str(tiny_model_dir))


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    """The session's one vLLM engine on the tiny model."""
    from cotune.engines import get_engine

    return get_engine("vllm", tiny_model_dir, max_lora_rank=16, max_loras=4)
