"""Inference engines behind one protocol, cached one per base model per process.

Loading a base model is the most expensive thing cotune does outside training, so an engine is
built once per (kind, model) in a process and reused across stages, epochs and jobs; adapters
are swapped per request, never by reloading the base model.

While a trainer runs, the cached engines step aside (``stepped_aside``: ``release()`` before,
``reacquire()`` after; DESIGN.md §7): on a GPU they free its memory for the trainer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.engines.base import (
    EngineKind,
    EngineStats,
    GenerationRequest,
    GenerationResult,
    InferenceEngine,
)
from cotune.errors import EngineError

_ENGINES: dict[tuple[str, str], InferenceEngine] = {}
_LOCK = threading.Lock()
# How many base models each kind of engine has loaded in this process (benchmarks report it).
LOADS: dict[str, int] = {}


def get_engine(kind: EngineKind, model: str | Path, **options: Any) -> InferenceEngine:
    """The process's engine for ``model``, built on first use with ``options``.

    ``model`` is a local model folder for ``vllm`` and ``transformers``, and a served model
    name for ``openai`` (whose ``options`` carry ``url`` and ``api_key``).
    """
    key = (kind, str(model) if kind != "openai" else f"{options.get('url')}#{model}")
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _build(kind, str(model), options)
            _ENGINES[key] = engine
            LOADS[kind] = LOADS.get(kind, 0) + 1
        else:
            _check_limits(engine, options)
        return engine


def _build(kind: EngineKind, model: str, options: dict[str, Any]) -> InferenceEngine:
    if kind == "vllm":
        from cotune.engines.vllm import VLLMEngine, VLLMSettings

        # LoRA limits are fixed when the engine starts and the engine outlives the job that
        # started it: never start below the defaults, so later jobs with more components fit.
        defaults = VLLMSettings()
        for name in ("max_lora_rank", "max_loras"):
            options[name] = max(options.get(name) or 0, getattr(defaults, name))
        return VLLMEngine(model, VLLMSettings(**options))
    if kind == "transformers":
        from cotune.engines.transformers import TransformersEngine

        return TransformersEngine(model, **options)
    if kind == "openai":
        from cotune.engines.openai import OpenAIEngine

        return OpenAIEngine(model=model, **options)
    raise EngineError(f"unknown engine kind {kind!r}; known: vllm, transformers, openai")


def _check_limits(engine: InferenceEngine, options: dict[str, Any]) -> None:
    """A cached vLLM engine must still fit the job's LoRA limits (they are fixed at start)."""
    settings = getattr(engine, "settings", None)
    for name in ("max_lora_rank", "max_loras"):
        wanted = options.get(name)
        have = getattr(settings, name, None)
        if wanted is not None and have is not None and wanted > have:
            raise EngineError(
                f"the cached engine for {engine.model_id} was started with {name}={have}; "
                f"this job needs {wanted}. Raise the engine setting {name} and restart."
            )


def cached_engines() -> list[InferenceEngine]:
    """The engines this process has built so far (a job's cost accounting reads their
    counters)."""
    with _LOCK:
        return list(_ENGINES.values())


@dataclass
class Switch:
    """How long the engines took to step aside and to come back (seconds)."""

    release_seconds: float = 0.0
    reacquire_seconds: float = 0.0


@contextmanager
def stepped_aside() -> Iterator[Switch]:
    """Release every cached engine for the block (a trainer on the same device), then
    reacquire them; yields the switch times (``reacquire_seconds`` is set on exit)."""
    engines = cached_engines()
    switch = Switch()
    started = time.perf_counter()
    for engine in engines:
        engine.release()
    switch.release_seconds = time.perf_counter() - started
    try:
        yield switch
    finally:
        started = time.perf_counter()
        for engine in engines:
            engine.reacquire()
        switch.reacquire_seconds = time.perf_counter() - started


def clear_engines() -> None:
    """Forget cached engines (tests; a worker shutting down)."""
    with _LOCK:
        _ENGINES.clear()


__all__ = [
    "LOADS",
    "EngineKind",
    "EngineStats",
    "GenerationRequest",
    "GenerationResult",
    "InferenceEngine",
    "Switch",
    "cached_engines",
    "clear_engines",
    "get_engine",
    "stepped_aside",
]
