"""The GPU fit check (``cotune.fit``) on real model configs, and the device settings that reach
the engine. Nothing here needs a GPU: the estimate reads ``config.json`` only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cotune.errors import SpecError
from cotune.fit import DeviceBudget, check_fits, estimate, read_shape
from cotune.models import MANIFEST
from cotune.runner import JobContext
from cotune.settings import Settings
from cotune.spec.job import TrainConfig, parse_job
from cotune.tiny import write_tiny_example

# The published configs (sizes, layers, vocabularies) of three real models; the API test of
# the fit check reads them too.
CONFIGS = Path(__file__).resolve().parents[1] / "data" / "model-configs"
LLAMA2_7B, LLAMA2_70B, SMOLLM2_135M = (
    json.loads((CONFIGS / f"{name}.json").read_text())
    for name in ("llama2-7b", "llama2-70b", "smollm2-135m")
)
H100 = DeviceBudget(gpus=1, memory_gib=80, share=0.85)


def model_folder(root: Path, config: dict[str, Any], **options: Any) -> Path:
    folder = root / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if options:
        (folder / MANIFEST).write_text(json.dumps({"options": options}))
    return folder


@pytest.mark.parametrize(
    ("config", "parameters"),
    [(LLAMA2_7B, 6_738_415_616), (SMOLLM2_135M, 134_515_008)],
)
def test_the_parameter_count_matches_the_published_one(
    tmp_path: Path, config: dict[str, Any], parameters: int
) -> None:
    shape = read_shape(model_folder(tmp_path, config))
    assert shape is not None
    assert estimate(shape, TrainConfig(), H100).parameters == parameters


def test_a_model_too_large_for_the_gpus_is_refused_with_the_numbers(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, LLAMA2_70B)
    with pytest.raises(SpecError) as caught:
        check_fits(folder, TrainConfig(), H100, param="system.models.big")
    err = caught.value
    assert err.param == "system.models.big"
    assert "does not fit the worker's GPUs" in err.message
    assert "68.98 B parameters" in err.message  # the estimate shown
    assert "68.0 GiB = 1 GPU(s) x 80.0 GiB x share 0.85" in err.message  # what was available


def test_qlora_needs_less_and_a_small_model_fits(tmp_path: Path) -> None:
    shape = read_shape(model_folder(tmp_path, LLAMA2_7B))
    assert shape is not None
    bf16 = estimate(shape, TrainConfig(), H100)
    four_bit = estimate(shape, TrainConfig(qlora=True), H100)
    assert four_bit.training_gib < bf16.training_gib / 2
    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text(json.dumps(SMOLLM2_135M))
    found = check_fits(small, TrainConfig(), H100, param="system.models.small")
    assert found is not None and found.fits


def test_tensor_parallel_beyond_the_workers_gpus_is_refused(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, SMOLLM2_135M, tensor_parallel=4)
    with pytest.raises(SpecError) as caught:
        check_fits(folder, TrainConfig(), H100, param="system.models.m")
    assert caught.value.param == "system.models.m"
    assert "tensor_parallel 4, but the worker has 1 GPU(s)" in caught.value.message


def test_an_incomplete_config_is_not_estimated(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, {"architectures": ["Mystery"]})
    assert check_fits(folder, TrainConfig(), H100, param="system.models.m") is None


# -- the device settings ------------------------------------------------------------------------


def test_device_settings_defaults_and_bounds() -> None:
    settings = Settings()
    assert settings.gpus is None and settings.gpu_memory_gib is None
    assert settings.gpu_memory_share == 0.85 and settings.release_cpu_engine is False
    for field, value in [("gpu_memory_share", 0), ("gpu_memory_share", 1.5), ("gpus", -1)]:
        with pytest.raises(ValidationError) as caught:
            Settings(**{field: value})
        assert caught.value.errors()[0]["loc"] == (field,)


def test_device_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COTUNE_GPUS", "2")
    monkeypatch.setenv("COTUNE_GPU_MEMORY_SHARE", "0.5")
    monkeypatch.setenv("COTUNE_RELEASE_CPU_ENGINE", "true")
    settings = Settings()
    assert (settings.gpus, settings.gpu_memory_share, settings.release_cpu_engine) == (2, 0.5, True)


def test_the_engine_options_split_the_share_among_the_jobs_engines(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    folder = write_tiny_example(tmp_path, model_path=str(tiny_model_dir))
    job = parse_job(
        {"system": "system.yaml", "data": {"train": "train.jsonl", "val": "val.jsonl"}},
        base_dir=folder,
    )
    settings = Settings(gpu_memory_share=0.8, release_cpu_engine=True)
    context = JobContext(job_id="j", job=job, store=None, artifacts=None, settings=settings)  # type: ignore[arg-type]
    options = context.local_engine_options()
    assert options["release_on_cpu"] is True
    assert options["gpu_memory_utilization"] == pytest.approx(0.8 / job.local_model_count())


def test_a_jobs_runs_reach_the_deployments_http_search_allow_list(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Every runner builds its JobContext without tools: the runtime must still take the
    settings' allow-list, or an http_search job the API accepted is refused when it runs."""
    from cotune.runtime import Runtime

    folder = write_tiny_example(tmp_path, model_path=str(tiny_model_dir))
    job = parse_job(
        {"system": "system.yaml", "data": {"train": "train.jsonl", "val": "val.jsonl"}},
        base_dir=folder,
    )
    settings = Settings(
        http_search_allowed_hosts=["search.example.com", "intranet"],
        http_search_private_hosts=["intranet"],
    )
    context = JobContext(
        job_id="j",
        job=job,
        store=None,
        artifacts=None,
        settings=settings,
        engines={},  # type: ignore[arg-type]
    )
    runtime = context.runtime()
    assert isinstance(runtime, Runtime)
    assert runtime.tools.allowed_hosts == {"search.example.com", "intranet"}
    assert runtime.tools.private_hosts == {"intranet"}
    assert runtime.tools.base_dir == folder
