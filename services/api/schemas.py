"""Response models in the OpenAI fine-tuning API's shapes, plus cotune's own objects.

Jobs, events and checkpoints parse as the ``openai`` SDK's ``FineTuningJob``,
``FineTuningJobEvent`` and ``FineTuningJobCheckpoint`` (extra fields are cotune's); lists are
``{"object": "list", "data": [...], "has_more": bool}`` with cursor pagination (``after`` = the
last id of the previous page). Metrics reuse ``cotune.records`` (the schema of the embedded
run's ``metrics.json``).
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from cotune.records import ComponentEpochRecord, EpochRecord, JobReport

T = TypeVar("T")

JobStatusName = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]


class ErrorDetail(BaseModel):
    code: str = Field(description="a stable machine-readable code, e.g. invalid_spec")
    message: str
    param: str | None = Field(
        default=None, description="the offending field (dotted, e.g. data.train), if any"
    )


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ListObject(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


# -- files ------------------------------------------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["data", "fine-tune", "feedback", "corpus"]
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    sha256: str
    rows: int = Field(description="rows checked at upload")
    fields: dict[str, int] = Field(description="field name -> rows holding a value")


class DeletedObject(BaseModel):
    id: str
    object: str
    deleted: bool = True


# -- jobs -------------------------------------------------------------------------------------


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="allow")

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float | Literal["auto"] | None = None
    learning_rate: float
    method: str
    lora_r: int
    lora_alpha: int
    train_epochs: int = Field(description="SFT/DPO epochs over the buffer, per loop epoch")


class JobMethod(BaseModel):
    """OpenAI's ``method`` of a job trained on given rows (an OpenAI-style job)."""

    type: Literal["supervised", "dpo"]
    supervised: dict[str, Any] | None = None
    dpo: dict[str, Any] | None = None


class JobResultSummary(BaseModel):
    base_val_score: float | None = None
    best_epoch: int | None = Field(default=None, description="None: no epoch beat the base")
    best_val_score: float | None = None
    base_test_score: float | None = None
    test_score: float | None = None
    stop_reason: str | None = None
    adapters: list[str] = Field(default_factory=list, description="components with adapters")


class JobObject(BaseModel):
    """A job, shaped as OpenAI's ``fine_tuning.job``."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None = None
    status: JobStatusName
    model: str = Field(description="the base model(s) of the system's components")
    fine_tuned_model: str | None = None
    organization_id: str = Field(description="the tenant")
    hyperparameters: Hyperparameters
    result_files: list[str] = Field(default_factory=list)
    training_file: str
    validation_file: str | None = None
    trained_tokens: int | None = None
    seed: int
    error: JobError | None = None
    estimated_finish: int | None = None
    method: JobMethod | None = Field(
        default=None, description="OpenAI's method, for a job trained on given rows; null else"
    )
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    # cotune's own
    name: str
    test_file: str | None = None
    cancel_requested: bool = False
    spec: dict[str, Any] | None = Field(
        default=None,
        description="the job spec as submitted (file ids, names); null in job lists, where "
        "whole specs made one page megabytes: GET the job for it",
    )
    result: JobResultSummary | None = None


class EventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] = "message"


class CheckpointMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    step: float
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None
    train_score: float | None = None
    val_score: float | None = None


class CheckpointObject(BaseModel):
    """A kept epoch, shaped as OpenAI's ``fine_tuning.job.checkpoint``."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int = Field(description="the epoch")
    epoch: EpochRecord


class JobMetrics(JobReport):
    object: Literal["job.metrics"] = "job.metrics"
    job_id: str
    cost: dict[str, float] = Field(
        default_factory=dict, description="totals over the stages: seconds, calls, tokens"
    )


class ComponentObject(BaseModel):
    object: Literal["job.component"] = "job.component"
    id: str = Field(description="the component's name")
    name: str
    kind: Literal["llm", "tool"]
    model: str | None = Field(default=None, description="registry name of its base model")
    tool: str | None = None
    trainable: bool
    reads: list[str]
    writes: str
    epochs: list[ComponentEpochRecord] = Field(default_factory=list)


class TraceObject(BaseModel):
    model_config = ConfigDict(extra="allow")

    object: Literal["job.trace"] = "job.trace"
    id: str = Field(description="<epoch>:<stage>:<trace id>, the cursor")
    epoch: int
    stage: str
    trace_id: str
    example_id: str
    inputs: dict[str, Any]
    expected: list[str] | None = None
    spans: list[dict[str, Any]] = Field(default_factory=list)
    output: Any = None
    score: float | None = None
    passed: bool | None = None
    score_samples: list[float] | None = Field(
        None, description="metric judge: each judge sample's score (``score`` is their mean)"
    )
    score_reason: str | None = Field(
        None, description="metric judge: the judge's reason (or why its replies were unusable)"
    )
    feedback: dict[str, Any] | None = Field(
        None,
        description="a rated run of data.feedback (a fixed trace): {rating, comment, "
        "corrected_output}; its output is the rated one, its score the rating",
    )


class QuoteObject(BaseModel):
    model_config = ConfigDict(extra="allow")

    object: Literal["job.quote"] = "job.quote"
    job: str
    epochs: int
    examples: dict[str, int]
    per_stage: dict[str, dict[str, int]]
    total: dict[str, int]
    budget: dict[str, Any]
    trainable_components: list[str]


class ModelObject(BaseModel):
    """OpenAI's model object, plus what a job needs to know: a base model's preparation status
    (jobs may name ``ready`` ones; a built-in shows ``registered`` until it is prepared)."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "cotune"
    kind: Literal["base", "judge"]
    description: str | None = None
    status: Literal["registered", "preparing", "ready", "failed"] | None = None
    error: str | None = None


class HealthObject(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
