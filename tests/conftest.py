"""Shared fixtures: the tiny model (built once, cached on disk), its task, one vLLM engine.

Everything here is real: the tiny model is a trained Llama, the engine is vLLM in-process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The live API of the reliability campaign (a module fixture, ``live``).
pytest_plugins = ["live_api"]

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


PG_ADMIN_URL = os.environ.get(
    "COTUNE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def create_pg_database(prefix: str) -> str:
    """A new PostgreSQL database migrated to head; its URL. PostgreSQL runs on every dev and
    CI machine of this project: if it is unreachable the test fails, it is not skipped."""
    from sqlalchemy import create_engine, text

    from cotune.store import create_database

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        pytest.fail(f"PostgreSQL not reachable at {PG_ADMIN_URL} (set COTUNE_TEST_PG_URL): {exc}")
    finally:
        admin.dispose()
    return create_database(PG_ADMIN_URL, prefix)


def drop_pg_database(url: str) -> None:
    from sqlalchemy import create_engine, make_url, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    admin.dispose()


@contextlib.contextmanager
def fresh_pg_database(prefix: str) -> Iterator[str]:
    """A new PostgreSQL database migrated to head (``create_pg_database``), dropped after."""
    url = create_pg_database(prefix)
    try:
        yield url
    finally:
        drop_pg_database(url)


def tiny_job_spec(files: dict[str, str], **extra: Any) -> dict[str, Any]:
    """A valid job spec for the tiny-kb task over uploaded files (name -> file id: train, val,
    test, corpus), small enough to validate fast; ``extra`` replaces top-level parts."""
    import json

    from cotune.tiny import TINY_SYSTEM

    system = json.loads(json.dumps(TINY_SYSTEM))
    system["components"][1]["args"]["corpus"] = files["corpus"]
    spec: dict[str, Any] = {
        "system": system,
        "data": {"train": files["train"], "val": files["val"], "test": files["test"]},
        "loop": {"epochs": 1, "rollout_batch": 12, "samples_per_component": 8, "judge_samples": 1},
        "train": {"lora_r": 4, "lora_alpha": 8},
    }
    spec.update(extra)
    return spec
