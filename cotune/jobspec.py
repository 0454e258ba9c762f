"""The job spec moved to ``cotune.spec.job``; this re-export keeps old imports working."""

# temporary: removed once service/workers import cotune.spec.job
from cotune.spec.job import (
    BudgetConfig,
    DataSplits,
    JobSpec,
    JudgeSpec,
    LoopConfig,
    TrainConfig,
    load_job,
    parse_job,
)

__all__ = [
    "BudgetConfig",
    "DataSplits",
    "JobSpec",
    "JudgeSpec",
    "LoopConfig",
    "TrainConfig",
    "load_job",
    "parse_job",
]
