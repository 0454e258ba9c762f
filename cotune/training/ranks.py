"""Which rank of a launched multi-process run this process is (``cotune.training.fsdp``); a
leaf, so the single-process trainer asks without importing the launcher."""

from __future__ import annotations

import os


def distributed() -> bool:
    """Whether this process is one rank of a launched FSDP run (any number of ranks: under
    ``accelerate launch --use_fsdp`` the model is wrapped even with one process, so the adapter
    is gathered and QLoRA's 4-bit storage is made shardable all the same)."""
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")
    # LOCAL_RANK: set by the launcher only; accelerate sets ACCELERATE_USE_FSDP itself when an
    # FSDP plugin is made in-process, which must not turn a later plain run into a rank.
    launched = "LOCAL_RANK" in os.environ
    return (fsdp and launched) or int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
