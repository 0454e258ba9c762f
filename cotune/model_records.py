"""What a registered base model is (``cotune models add``), as data: a leaf module, so that
the model cache (``cotune.models``) can name it without importing the store that keeps it
(``cotune.store.registry``)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SourceKind = Literal["hf", "path", "gguf"]
SOURCE_KINDS: tuple[str, ...] = ("hf", "path", "gguf")


class ModelStatus(StrEnum):
    registered = "registered"
    preparing = "preparing"
    ready = "ready"
    failed = "failed"


class ModelOptions(BaseModel):
    """How a registered model is served and trained (``cotune models add`` flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chat_template: str | None = Field(
        default=None,
        description="a Jinja chat template (the file's contents) replacing the model's own",
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="the longest prompt + output the engine accepts"
    )
    tensor_parallel: int = Field(default=1, ge=1, le=64, description="GPUs one engine spans")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="the weights' dtype when loaded (auto: as saved)"
    )


class RegisteredModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    kind: SourceKind
    source: str
    options: ModelOptions
    status: ModelStatus
    error: str | None = None
    created_at: datetime
    updated_at: datetime
    prepared_at: datetime | None = None

    @property
    def description(self) -> str:
        """What the API may show: the hub repository, never a server path."""
        if self.kind == "hf":
            return f"Hugging Face Hub: {self.source}"
        return "a local model folder" if self.kind == "path" else "a GGUF file, converted"
