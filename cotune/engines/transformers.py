"""Hugging Face ``transformers`` in-process: the engine that needs nothing but torch.

Batched ``generate`` with left padding over chat-templated prompts. Greedy requests
(``temperature == 0``) share batches; sampled requests are grouped by temperature and each
group runs under its own seed (a request's ``seed`` when it has one, then it runs alone so
the seed alone decides its output), inside ``torch.random.fork_rng`` so the process's global
RNG is left as it was.

Adapters are PEFT folders: the first one wraps the base model with
``PeftModel.from_pretrained``, later ones are added with ``load_adapter``, and each call picks
its adapter with ``set_adapter``; base-model calls run inside ``disable_adapter()``. An adapter
folder whose weights changed (retrained in place) is loaded again under a new name and the
stale copy deleted, as in ``cotune.engines.vllm``.

JSON-schema requests: HF ``generate`` cannot constrain decoding, so they are generated like
any other request (``supports_json_schema()`` is False) and the caller (the judge) repairs and
validates the output downstream.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from cotune.engines.base import EngineStats, GenerationRequest, GenerationResult
from cotune.errors import EngineError

_DTYPES = ("float32", "float16", "bfloat16", "auto")


def adapter_key(adapter: str) -> tuple[str, int, int]:
    """(resolved path, weights mtime in ns, weights size): a retrained adapter gets a new key."""
    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.exists():
        weights = Path(adapter) / "adapter_model.bin"
    try:
        stat = weights.stat()
    except FileNotFoundError as err:
        raise EngineError(f"adapter {adapter}: no adapter_model.safetensors") from err
    return (str(Path(adapter).resolve()), stat.st_mtime_ns, stat.st_size)


class TransformersEngine:
    kind = "transformers"

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        if dtype not in _DTYPES:
            raise EngineError(f"dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}")
        if batch_size < 1:
            raise EngineError(f"batch_size must be at least 1, not {batch_size}")
        self.model_id = str(model_path)
        self.dtype = dtype
        self.batch_size = batch_size
        self.seed = seed
        self.stats = EngineStats()
        self._rng = random.Random(seed)  # seeds for sampled requests that bring none
        self._lock = threading.Lock()  # the active adapter is model state: one call at a time
        self._adapters: dict[tuple[str, int, int], str] = {}
        self._peft = False  # whether self._model is a PeftModel yet
        self._device = device or self._default_device()
        self._released = False
        self._tokenizer, self._model = self._load()

    @staticmethod
    def _default_device() -> str:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def _load(self) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model: Any
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_id, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(
                self.model_id,
                dtype=self.dtype if self.dtype == "auto" else getattr(torch, self.dtype),
                trust_remote_code=False,
            )
        except Exception as err:  # OSError, ValueError, ...: the caller needs the model named
            raise EngineError(f"transformers could not load {self.model_id}: {err}") from err
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.chat_template is None:
            raise EngineError(f"{self.model_id}: the tokenizer has no chat template")
        model.to(self._device)
        model.eval()
        return tokenizer, model

    def supports_json_schema(self) -> bool:
        return False

    # -- stepping aside for a trainer ---------------------------------------------------------

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """On a GPU, move the weights (adapters included) to host memory; on a CPU there is
        nothing to hand to a trainer, so the model stays where it is."""
        with self._lock:
            if self._released:
                return
            self._released = True
            if self._device != "cpu":
                import torch

                self._model.to("cpu")
                torch.cuda.empty_cache()

    def reacquire(self) -> None:
        with self._lock:
            if not self._released:
                return
            if self._device != "cpu":
                self._model.to(self._device)
            self._released = False

    @property
    def model(self) -> Any:
        """The model (a ``PeftModel`` once an adapter was loaded), for benchmarks and tests."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    # -- adapters ------------------------------------------------------------------------------

    def _activate(self, adapter: str) -> str:
        """Load ``adapter`` if it is new (or changed on disk), make it active, return its name."""
        key = adapter_key(adapter)
        name = self._adapters.get(key)
        if name is None:
            name = f"adapter-{len(self.stats.adapters_loaded) + 1}"
            try:
                if not self._peft:
                    from peft import PeftModel

                    self._model = PeftModel.from_pretrained(
                        self._model, key[0], adapter_name=name, is_trainable=False
                    )
                    self._model.eval()
                    self._peft = True
                else:
                    self._model.load_adapter(key[0], adapter_name=name, is_trainable=False)
            except Exception as err:  # peft raises ValueError, KeyError, OSError, ...
                raise EngineError(f"could not load adapter {adapter}: {err}") from err
            stale = [k for k in self._adapters if k[0] == key[0]]
            self._adapters[key] = name
            self.stats.adapters_loaded.append(key[0])
            self._model.set_adapter(name)
            for old in stale:  # the same folder, retrained: free the old weights
                self._model.delete_adapter(self._adapters.pop(old))
        self._model.set_adapter(name)
        return name

    @contextmanager
    def _using(self, adapter: str | None) -> Iterator[None]:
        if adapter is not None:
            self._activate(adapter)
            yield
        elif self._peft:
            with self._model.disable_adapter():
                yield
        else:
            yield

    # -- generation ----------------------------------------------------------------------------

    def generate(
        self, requests: list[GenerationRequest], adapter: str | None = None
    ) -> list[GenerationResult]:
        if not requests:
            return []
        self.reacquire()
        started = time.perf_counter()
        results: list[GenerationResult | None] = [None] * len(requests)
        with self._lock, self._using(adapter):
            for indices, temperature, seed in self._groups(requests):
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    chunk_seed = None if seed is None else seed + start
                    outputs = self._run([requests[i] for i in chunk], temperature, chunk_seed)
                    for i, out in zip(chunk, outputs, strict=True):
                        results[i] = out
        done = [r for r in results if r is not None]
        self.stats.add(done, time.perf_counter() - started)
        return done

    def _groups(
        self, requests: list[GenerationRequest]
    ) -> list[tuple[list[int], float, int | None]]:
        """(request indices, temperature, seed): greedy requests together, sampled ones by
        temperature, each seeded request alone."""
        greedy: list[int] = []
        by_temperature: dict[float, list[int]] = {}
        seeded: list[tuple[list[int], float, int | None]] = []
        for i, request in enumerate(requests):
            if request.temperature <= 0:
                greedy.append(i)
            elif request.seed is not None:
                seeded.append(([i], request.temperature, request.seed))
            else:
                by_temperature.setdefault(request.temperature, []).append(i)
        groups: list[tuple[list[int], float, int | None]] = []
        if greedy:
            groups.append((greedy, 0.0, None))
        for temperature, indices in by_temperature.items():
            groups.append((indices, temperature, self._rng.randrange(2**31)))
        return groups + seeded

    def _run(
        self, requests: list[GenerationRequest], temperature: float, seed: int | None
    ) -> list[GenerationResult]:
        import torch

        tok = self._tokenizer
        prompts = [
            tok.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False)
            for r in requests
        ]
        # The chat template already holds any special tokens the model expects.
        encoded = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = {k: v.to(self._device) for k, v in encoded.items()}
        max_new = max(r.max_tokens for r in requests)
        eos_ids = self._eos_ids()
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new,
            eos_token_id=eos_ids,
            pad_token_id=tok.pad_token_id,
        )
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        rng: AbstractContextManager[Any] = nullcontext()
        if seed is not None:
            devices = [self._device] if str(self._device).startswith("cuda") else []
            rng = torch.random.fork_rng(devices=devices)
        with rng, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            output = self._model.generate(**encoded, **kwargs)
        width = encoded["input_ids"].shape[1]
        prompt_lengths = encoded["attention_mask"].sum(dim=1).tolist()
        results = []
        for row, request, prompt_tokens in zip(output, requests, prompt_lengths, strict=True):
            # Each request keeps its own limit; for greedy, truncating a longer run is exact.
            new = row[width:].tolist()[: request.max_tokens]
            finish = "length"
            for position, token in enumerate(new):
                if token in eos_ids:
                    new, finish = new[: position + 1], "stop"
                    break
            text_ids = new[:-1] if finish == "stop" else new
            results.append(
                GenerationResult(
                    text=tok.decode(text_ids, skip_special_tokens=True),
                    prompt_tokens=int(prompt_tokens),
                    completion_tokens=len(new),
                    finish_reason=finish,
                )
            )
        return results

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        configured = getattr(self._model.generation_config, "eos_token_id", None)
        for value in (configured, self._tokenizer.eos_token_id):
            if value is None:
                continue
            for token in value if isinstance(value, list) else [value]:
                if int(token) not in ids:
                    ids.append(int(token))
        if not ids:
            raise EngineError(f"{self.model_id}: neither the tokenizer nor the model names eos")
        return ids
