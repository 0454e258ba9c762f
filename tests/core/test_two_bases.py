"""One job, two different base models (issue 13): ``examples/two-bases``, whose query writer
runs on a second tiny model and whose answer writer on the tiny model, trained together end to
end, then bundled and served.

The second model is the tiny model built with another seed (``tiny_model_b_dir``): its own
tokenizer and weights, trained on another world of the same rule. SmolLM2-135M would need
``cotune models prepare``, a download a test may not make. In a temporary ``COTUNE_HOME`` the
built-in ``tiny`` is a copy of the test's tiny model and ``tiny-b`` is registered with
``cotune models add --path``, as an admin would. Capped: small splits, one loop epoch.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cotune.spec.job import JobSpec

JOB = """\
system: system.yaml
data: {train: train.jsonl, val: val.jsonl, test: test.jsonl}
judge: {model: answers, max_tokens: 256}
loop: {epochs: 1, rollout_batch: 16, samples_per_component: 16, judge_samples: 1, seed: 0}
train: {epochs: 2, batch_size: 8, learning_rate: 5.0e-3, dpo_learning_rate: 1.0e-3,
        lora_r: 8, lora_alpha: 16}
"""
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "two-bases"
BASES = {"queries": "tiny-b", "answers": "tiny"}  # alias -> model name, as the example says
USES = {"query": "queries", "answer": "answers"}  # component -> alias


@pytest.fixture(scope="module")
def home(
    tiny_model_dir: Path, tiny_model_b_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A ``COTUNE_HOME`` holding the built-in ``tiny`` and, registered by folder, ``tiny-b``."""
    from cotune.model_records import ModelOptions
    from cotune.model_registry import add_model
    from cotune.models import MANIFEST
    from cotune.store import JobStore
    from cotune.store.registry import ModelStore

    root = tmp_path_factory.mktemp("two-bases")
    tiny = root / "home" / "models" / "tiny"
    shutil.copytree(tiny_model_dir, tiny)
    (tiny / MANIFEST).write_text(json.dumps({"name": "tiny", "source": {"kind": "tiny"}}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COTUNE_HOME", str(root / "home"))
        with JobStore(f"sqlite:///{root / 'cotune.db'}", auto_migrate=True) as store:
            add_model(ModelStore(store), "tiny-b", "path", str(tiny_model_b_dir), ModelOptions(),
                      progress=None)  # fmt: skip
        yield root / "home"


@pytest.fixture(scope="module")
def job(home: Path, tmp_path_factory: pytest.TempPathFactory) -> JobSpec:
    from cotune.spec.job import load_job
    from cotune.tiny import write_tiny_example

    folder = write_tiny_example(tmp_path_factory.mktemp("tiny-kb"), splits=(24, 8, 8))
    shutil.copy(EXAMPLE / "system.yaml", folder / "system.yaml")
    (folder / "job.yaml").write_text(JOB)
    return load_job(folder / "job.yaml")


@pytest.fixture(scope="module")
def finished(
    job: JobSpec, home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Any, set[str]]]:
    """The job run in-process; the model folders of the vLLM engines it started."""
    from cotune.embedded import run_embedded
    from cotune.engines import cached_engines

    before = {id(engine) for engine in cached_engines()}
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COTUNE_HOME", str(home))
        report = run_embedded(job, out, progress=False)
    started = {e.model_id for e in cached_engines() if id(e) not in before}
    yield out, report, started


def test_one_engine_per_base_model(finished: tuple[Path, Any, set[str]], home: Path) -> None:
    _, _, started = finished
    assert started == {str(home / "models" / name) for name in BASES.values()}


def test_each_component_trains_its_own_adapter_on_its_own_base(
    finished: tuple[Path, Any, set[str]], home: Path
) -> None:
    from safetensors.numpy import load_file

    out, report, _ = finished
    [epoch] = report.epochs
    for record in epoch.components:
        assert record.trained and record.samples > 0, record
    assert report.best_epoch == 1, "the tiny task's corrections lift val; nothing was kept"
    for component, alias in USES.items():
        folder = out / "adapters" / component
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == BASES[alias]  # the name, not a path
        weights = load_file(folder / "adapter_model.safetensors")
        lora_b = [w for name, w in weights.items() if "lora_B" in name]
        assert lora_b and any(abs(w).max() > 0 for w in lora_b)  # B starts at zero


@pytest.fixture(scope="module")
def bundle(
    finished: tuple[Path, Any, set[str]],
    job: JobSpec,
    home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    from cotune.bundle import build_bundle

    out, _, _ = finished
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COTUNE_HOME", str(home))
        return build_bundle(
            job.system,
            {component: out / "adapters" / component for component in USES},
            tmp_path_factory.mktemp("bundles") / "two-bases",
            base_models=BASES,
            job_name="two-bases",
        )


def test_the_manifest_lists_both_base_models(bundle: Path, home: Path) -> None:
    from cotune.bundle import verify_bundle

    assert verify_bundle(bundle) == []
    manifest = json.loads((bundle / "manifest.json").read_text())
    bases = manifest["base_models"]
    assert sorted(bases) == sorted(BASES)
    for alias, name in BASES.items():
        assert bases[alias]["name"] == name and bases[alias]["kind"] == "registry"
        assert bases[alias]["components"] == [c for c, a in USES.items() if a == alias]
    assert bases["queries"]["fingerprint"] != bases["answers"]["fingerprint"]


@pytest.mark.slow
def test_the_bundle_serves_both_adapters(bundle: Path, home: Path) -> None:
    """``serve.sh BASE`` for each base in turn (one vLLM server at a time keeps memory down):
    each serves its base and its component's adapter, and the adapter answers."""
    from e2e import serve_env, serving

    from cotune.tiny import QUERY_PROMPT, make_world

    world = make_world()
    prompt = QUERY_PROMPT.format(question=world.question(sorted(world.facts)[0]))
    for component, alias in USES.items():
        log = bundle.parent / f"serve-{alias}.log"
        with serving(bundle, serve_env(COTUNE_HOME=str(home)), log, alias) as url:
            served = {m["id"] for m in httpx.get(f"{url}/models", timeout=10).json()["data"]}
            assert served == {alias, component}
            response = httpx.post(
                f"{url}/chat/completions",
                json={
                    "model": component,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 8,
                    "temperature": 0,
                },
                timeout=60,
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["model"] == component and body["usage"]["completion_tokens"] > 0
