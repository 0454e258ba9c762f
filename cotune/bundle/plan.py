"""The bundle's plan: the adapters checked and grouped by base model, each base model
described (registry name or folder, cotune's record, a fingerprint) with its vLLM LoRA rank."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

from cotune.bundle.adapters import _check_adapter
from cotune.bundle.layout import VLLM_LORA_RANKS, BundleError
from cotune.spec import SystemSpec


def _plan(
    system: SystemSpec, adapters: dict[str, Path], base_models: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """Group the adapters by base model alias and describe each base model."""
    from cotune.models import models_dir, registry_names

    registry = registry_names()  # built-ins and registered models prepared here

    plan: dict[str, dict[str, Any]] = {}
    for component, folder in adapters.items():
        try:
            spec = system.component(component)
        except KeyError:
            raise BundleError(f"system {system.name!r} has no component {component!r}") from None
        if spec.kind != "llm" or spec.model is None:
            raise BundleError(f"component {component!r} is a {spec.kind} component: no adapter")
        rank = _check_adapter(component, Path(folder))
        alias = spec.model
        if alias not in plan:
            plan[alias] = {"components": [], "ranks": {}}
        plan[alias]["components"].append(component)
        plan[alias]["ranks"][component] = rank

    taken = set(adapters)
    for alias, entry in plan.items():
        entry["components"].sort()
        source = base_models.get(alias)
        ref = system.models[alias]
        if source is None:
            source = ref.name if ref.name is not None else str(system.resolve_path(ref.path or ""))
        info: dict[str, Any]
        if source in registry:
            folder = models_dir() / source
            info = {"kind": "registry", "name": source, "prepared": folder.is_dir()}
            info.update(_model_record(folder))
        else:
            folder = Path(source).expanduser().resolve()
            if not (folder / "config.json").is_file():
                raise BundleError(
                    f"base model {alias!r}: {source!r} is neither a registry name "
                    f"({sorted(registry)}) nor a model folder holding config.json"
                )
            info = {"kind": "path", "path": str(folder)}
            info.update(_model_record(folder))
        served = alias if alias not in taken else f"{alias}-base"
        taken.add(served)
        info["served_model_name"] = served
        info["components"] = entry["components"]
        entry.update(source=source, manifest=info, served=served)
        entry["max_lora_rank"] = _vllm_rank(max(entry["ranks"].values()), alias)
    return plan


def _model_record(folder: Path) -> dict[str, Any]:
    """What a base model folder says about itself: cotune's record and a cheap fingerprint."""
    from cotune.models import MANIFEST as MODEL_RECORD

    record: dict[str, Any] = {"cotune_model": None, "fingerprint": None}
    if not folder.is_dir():
        return record
    for name in (MODEL_RECORD, "cotune_tiny.json"):
        path = folder / name
        if path.is_file() and not path.is_symlink():
            key = "cotune_model" if name == MODEL_RECORD else "cotune_tiny"
            with contextlib.suppress(OSError, ValueError):
                record[key] = json.loads(path.read_text(encoding="utf-8"))
    # config.json's content and the weight files' names and sizes: it tells two models apart
    # without reading gigabytes of weights.
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}\n".encode())
    record["fingerprint"] = "sha256:" + digest.hexdigest()
    return record


def _vllm_rank(rank: int, alias: str) -> int:
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise BundleError(
        f"base model {alias!r}: LoRA rank {rank} exceeds vLLM's largest {VLLM_LORA_RANKS[-1]}"
    )
