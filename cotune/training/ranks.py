"""Which rank of a launched multi-process run this process is (``cotune.training.fsdp``); a
leaf, so the single-process trainer asks without importing the launcher."""

from __future__ import annotations

import os


def distributed() -> bool:
    """Whether this process is one rank of a launched multi-process run."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
