"""Any OpenAI-compatible chat-completions endpoint, over plain ``httpx``.

The ``openai`` SDK is not used, to keep the core light. ``url`` is the API base, such as
``http://127.0.0.1:8000/v1``; requests go to ``{url}/chat/completions`` with ``model`` set to
the served model name, or, for a call through an adapter, to the adapter's served name.

Adapters (vLLM servers started with ``--enable-lora`` and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) are loaded at run time with
``POST {url}/load_lora_adapter``, once per (path, weights mtime, weights size). The served name
is derived from that key, so every process that talks to the same server agrees on it, and an
"already loaded" answer (another process, or a restarted engine, loaded it first) counts as
success. A folder retrained in place gets a new key and so a new name: the server never serves
stale weights. The adapter path must be readable by the server.

JSON-schema requests send ``response_format`` of type ``json_schema``. A vLLM server should be
started with ``--structured-outputs-config '{"backend": "xgrammar", "disable_any_whitespace":
true}'``: vLLM 0.32 reads that flag per server, not per request, and without it small models
wander off into blank lines inside the JSON until ``max_tokens``.

Connection errors, timeouts, 429 and 5xx are retried with exponential backoff; other failures
raise ``EngineError`` naming the url and the status. The api key never appears in an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cotune.engines.base import EngineStats, GenerationRequest, GenerationResult
from cotune.errors import EngineError

_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


def adapter_key(adapter: str) -> tuple[str, int, int]:
    """(resolved path, weights mtime in ns, weights size): a retrained adapter gets a new key."""
    folder = Path(adapter)
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        weights = folder / "adapter_model.bin"
    try:
        stat = weights.stat()
    except FileNotFoundError as err:
        raise EngineError(f"adapter {adapter}: no adapter_model.safetensors") from err
    return (str(folder.resolve()), stat.st_mtime_ns, stat.st_size)


def served_adapter_name(key: tuple[str, int, int]) -> str:
    """A stable served name for an adapter version: the folder's name plus a digest of the key."""
    digest = hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()[:12]
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(key[0]).name)[:40]
    return f"cotune-{stem}-{digest}"


class OpenAIEngine:
    kind = "openai"

    def __init__(
        self,
        model: str,
        url: str,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 8,
        backoff: float = 0.5,
    ) -> None:
        import httpx

        if not url.startswith(("http://", "https://")):
            raise EngineError(f"url must start with http:// or https://, not {url!r}")
        if concurrency < 1:
            raise EngineError(f"concurrency must be at least 1, not {concurrency}")
        if api_key is None and api_key_env is not None:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise EngineError(f"the environment variable {api_key_env} is not set")
        self.model = model
        self.model_id = model
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.backoff = backoff
        self.stats = EngineStats()
        self._api_key = api_key
        self._adapters: dict[tuple[str, int, int], str] = {}
        self._adapter_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

    def __repr__(self) -> str:  # never the key
        return f"OpenAIEngine(model={self.model!r}, url={self.url!r})"

    def supports_json_schema(self) -> bool:
        return True

    # The model runs on another machine: nothing here to step aside.
    released = False

    def release(self) -> None:
        pass

    def reacquire(self) -> None:
        pass

    def close(self) -> None:
        self._client.close()

    # -- http ----------------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def _post(self, path: str, body: dict[str, Any], *, accept: tuple[int, ...] = ()) -> Any:
        """POST with retries; returns the response (2xx, or a status listed in ``accept``)."""
        import httpx

        endpoint = f"{self.url}{path}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                time.sleep(delay * (1 + 0.25 * random.random()))
            try:
                response = self._client.post(endpoint, json=body)
            except httpx.TimeoutException as err:
                last = f"timed out after {self.timeout} s ({type(err).__name__})"
                continue
            except httpx.TransportError as err:
                last = f"connection failed ({type(err).__name__}: {self._redact(str(err))})"
                continue
            if response.status_code < 300 or response.status_code in accept:
                return response
            detail = self._redact(response.text[:500])
            last = f"HTTP {response.status_code}: {detail}"
            if response.status_code not in _RETRY_STATUS:
                raise EngineError(f"POST {endpoint} failed with {last}")
        raise EngineError(f"POST {endpoint} failed after {self.max_retries + 1} attempts: {last}")

    # -- adapters ------------------------------------------------------------------------------

    def _served_name(self, adapter: str | None) -> str:
        if adapter is None:
            return self.model
        key = adapter_key(adapter)
        with self._adapter_lock:
            name = self._adapters.get(key)
            if name is None:
                name = served_adapter_name(key)
                response = self._post(
                    "/load_lora_adapter", {"lora_name": name, "lora_path": key[0]}, accept=(400,)
                )
                if response.status_code == 400 and "already" not in response.text.lower():
                    raise EngineError(
                        f"POST {self.url}/load_lora_adapter failed with HTTP 400 for adapter "
                        f"{adapter}: {self._redact(response.text[:500])}"
                    )
                self._adapters[key] = name
                self.stats.adapters_loaded.append(key[0])
        return name

    # -- generation ----------------------------------------------------------------------------

    def _body(self, request: GenerationRequest, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.json_schema},
            }
        return body

    def _one(self, request: GenerationRequest, model: str) -> GenerationResult:
        response = self._post("/chat/completions", self._body(request, model))
        try:
            data = response.json()
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return GenerationResult(
                text=choice["message"].get("content") or "",
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                finish_reason=choice.get("finish_reason"),
            )
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise EngineError(
                f"POST {self.url}/chat/completions returned an unexpected body: "
                f"{self._redact(response.text[:300])}"
            ) from err

    def generate(
        self, requests: list[GenerationRequest], adapter: str | None = None
    ) -> list[GenerationResult]:
        if not requests:
            return []
        started = time.perf_counter()
        model = self._served_name(adapter)
        if len(requests) == 1 or self.concurrency == 1:
            results = [self._one(r, model) for r in requests]
        else:
            workers = min(self.concurrency, len(requests))
            with ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix="cotune-openai"
            ) as pool:
                results = list(pool.map(lambda r: self._one(r, model), requests))
        with self._stats_lock:
            self.stats.add(results, time.perf_counter() - started)
        return results
