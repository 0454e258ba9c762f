"""How long the vLLM engine takes to step aside for a trainer and come back (DESIGN.md §7).

For each mode the engine is started once, then ``--cycles`` times released and reacquired; the
table gives the median seconds of each step, the first generation after coming back, and the
memory the release gave back (process RSS on a CPU, device memory on a GPU). Modes: on a CPU
``stay`` (the default: the engine stays loaded) and ``release`` (``release_on_cpu``: shut down
and started again); on a CUDA GPU ``sleep`` (``sleep(level=1)`` / ``wake_up()``).

    python benchmarks/engine_switch.py                      # the tiny test model
    python benchmarks/engine_switch.py --model ~/.cache/cotune/models/smollm2-135m
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path
from typing import Any

import machine

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def memory_mib(gpu: bool) -> float:
    """Device memory in use (GPU) or this process's resident memory (CPU), in MiB."""
    if gpu:
        import torch

        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(model: Path, mode: str, cycles: int, gpu: bool) -> dict[str, Any]:
    from cotune.engines.base import GenerationRequest
    from cotune.engines.vllm import VLLMEngine, VLLMSettings

    request = [GenerationRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=8)]
    started = time.perf_counter()
    engine = VLLMEngine(model, VLLMSettings(max_lora_rank=16, release_on_cpu=mode == "release"))
    start = time.perf_counter() - started
    first = engine.generate(request)[0].text
    release, reacquire, generate, freed = [], [], [], []
    for _ in range(cycles):
        before = memory_mib(gpu)
        started = time.perf_counter()
        engine.release()
        release.append(time.perf_counter() - started)
        freed.append(before - memory_mib(gpu))
        started = time.perf_counter()
        engine.reacquire()
        reacquire.append(time.perf_counter() - started)
        started = time.perf_counter()
        again = engine.generate(request)[0].text
        generate.append(time.perf_counter() - started)
        assert again == first, f"{mode}: the output changed across a switch"
    engine.release()  # the next mode starts with this one's memory back
    return {
        "mode": mode,
        "start": start,
        "release": statistics.median(release),
        "reacquire": statistics.median(reacquire),
        "generate": statistics.median(generate),
        "freed": statistics.median(freed),
    }


def default_model() -> Path:
    """The test suite's tiny model (built and cached by tests/conftest.py)."""
    cache = Path(os.environ.get("COTUNE_TEST_CACHE", Path(__file__).parents[1] / ".cache/tests"))
    found = sorted(cache.glob("tiny-model-*"))
    if not found:
        raise SystemExit(f"no tiny model in {cache}; give --model or run the tests once")
    return found[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a model folder")
    parser.add_argument("--cycles", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    from cotune.engines.vllm import on_gpu

    gpu = on_gpu()
    model = args.model or default_model()
    modes = ["sleep"] if gpu else ["stay", "release"]
    rows = [measure(model, mode, args.cycles, gpu) for mode in modes]
    device = torch.cuda.get_device_name(0) if gpu else machine.describe()
    lines = [
        f"Engine switch on {model.name}, {datetime.date.today()}, {device}, "
        f"median of {args.cycles} cycles",
        "",
        "| mode | engine start (s) | release (s) | reacquire (s) | first generate after (s) | "
        f"{'device' if gpu else 'RSS'} memory freed (MiB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['mode']} | {row['start']:.1f} | {row['release']:.2f} | "
            f"{row['reacquire']:.2f} | {row['generate']:.2f} | {row['freed']:.0f} |"
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
