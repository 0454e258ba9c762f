"""What training takes and gives: SFT rows, DPO pairs, the result, the adapter's file names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_NAME = "default"  # peft's default; never "train" (it clashes with nn.Module.train)

Progress = Callable[[str], None]


@dataclass
class SFTRow:
    """One training example for a component."""

    messages: list[dict[str, str]]  # the rendered prompt messages (system?/user)
    completion: str  # the target output
    source: str = ""  # "bootstrap" | "correction" | "downstream" | "augment" | "given" | "target"


@dataclass
class DPOPair:
    """One preference pair: the same prompt, a preferred and a dispreferred output."""

    messages: list[dict[str, str]]
    chosen: str
    rejected: str


@dataclass
class TrainResult:
    adapter_dir: Path
    sft_losses: list[float] = field(default_factory=list)
    dpo_losses: list[float] = field(default_factory=list)
    sft_steps: int = 0
    dpo_steps: int = 0
    trained_tokens: int = 0  # prompt + completion tokens the trainers processed, all epochs
    seconds: float = 0.0
