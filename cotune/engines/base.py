"""The contract every inference engine meets; the runtime and the loop see only this."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Message = dict[str, str]
EngineKind = Literal["vllm", "transformers", "openai"]


@dataclass(frozen=True)
class GenerationRequest:
    """One chat completion. ``json_schema`` constrains the output where the engine can."""

    messages: list[Message]
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int | None = None
    json_schema: dict[str, Any] | None = None

    def sampling(self) -> dict[str, Any]:
        """The sampling parameters as recorded in a span."""
        params: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.seed is not None:
            params["seed"] = self.seed
        if self.json_schema is not None:
            params["json_schema"] = True
        return params


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None


@dataclass
class EngineStats:
    """Counters the loop reads to report a stage's cost."""

    calls: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    adapters_loaded: list[str] = field(default_factory=list)

    def add(self, results: list[GenerationResult], seconds: float) -> None:
        self.calls += 1
        self.requests += len(results)
        self.prompt_tokens += sum(r.prompt_tokens for r in results)
        self.completion_tokens += sum(r.completion_tokens for r in results)
        self.seconds += seconds

    def snapshot(self) -> dict[str, float]:
        return {
            "calls": self.calls,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "seconds": round(self.seconds, 3),
        }


@runtime_checkable
class InferenceEngine(Protocol):
    """Generates chat completions for a batch, optionally through a LoRA adapter.

    ``adapter`` is the path of a PEFT folder; engines load each adapter once and reuse it
    (loading is idempotent, also across a release). ``None`` means the base model.

    ``release()`` steps aside for a trainer on the same device and ``reacquire()`` comes back
    (DESIGN.md §7): both idempotent, and ``generate`` on a released engine reacquires first, so
    a missed ``reacquire`` costs time, never a wrong answer. What releasing frees depends on the
    engine and device (``released`` says whether it is stepped aside now).
    """

    kind: str
    model_id: str
    stats: EngineStats

    def generate(
        self, requests: list[GenerationRequest], adapter: str | None = None
    ) -> list[GenerationResult]: ...

    def supports_json_schema(self) -> bool: ...

    @property
    def released(self) -> bool: ...

    def release(self) -> None: ...

    def reacquire(self) -> None: ...
