"""The OpenAPI document with a typed job body: ``POST /v1/jobs`` (and ``/v1/fine_tuning/jobs``)
and ``/quote`` take a JSON object that the route checks itself (``cotune.openai_jobs``, then
``policy.check_job_for_http``, errors that name the field), and the document describes it with
the core's own models, so a fuzzer or an SDK generator can build a valid job from the schema.

The body is one union, ``JobCreate``: a job spec with its system (``CompoundJobCreate``: the
spec, ``cotune.spec``, plus OpenAI's ``model``, ``training_file``, ``validation_file`` and
``seed``, as the openai SDK sends a spec in ``extra_body``) or OpenAI's single-model job
(``OpenAIJobCreate``)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from cotune.openai_jobs import OpenAIJobCreate
from cotune.spec.job import JobSpec

PREFIX = "Spec"  # the spec's models beside the API's own (``Component`` vs ``ComponentObject``)
OPENAI_PREFIX = "OpenAI"  # OpenAI's body's models (its ``Hyperparameters`` vs the job object's)
JOB_SPEC_REF = f"#/components/schemas/{PREFIX}JobSpec"
JOB_CREATE_REF = "#/components/schemas/JobCreate"
# On a route: its request body is the typed union (FastAPI merges this into the operation).
JOB_SPEC_BODY: dict[str, Any] = {
    "requestBody": {"content": {"application/json": {"schema": {"$ref": JOB_CREATE_REF}}}}
}
# OpenAI's fields that a job spec may carry beside its system (``cotune.openai_jobs``).
COMPOUND_OPENAI_FIELDS = ("model", "training_file", "validation_file", "seed")
# What only a local job file may hold: never over HTTP.
LOCAL_ONLY = ("base_dir",)


def job_spec_schemas() -> dict[str, Any]:
    """The job spec's JSON schemas by component name, the job itself as ``SpecJobSpec``."""
    schema = JobSpec.model_json_schema(ref_template=f"#/components/schemas/{PREFIX}{{model}}")
    defs = schema.pop("$defs", {})
    for name in LOCAL_ONLY:
        schema["properties"].pop(name, None)
    return {f"{PREFIX}{name}": value for name, value in {**defs, "JobSpec": schema}.items()}


def job_create_schemas() -> dict[str, Any]:
    """``JobCreate``, the union a create (or quote) body is, and its two branches."""
    openai = OpenAIJobCreate.model_json_schema(
        ref_template=f"#/components/schemas/{OPENAI_PREFIX}{{model}}"
    )
    defs = {f"{OPENAI_PREFIX}{k}": v for k, v in openai.pop("$defs", {}).items()}
    compound = job_spec_schemas()[f"{PREFIX}JobSpec"]
    compound = {
        **compound,
        "title": "CompoundJobCreate",
        "description": "a job spec with its system inline; OpenAI's fields beside it fill "
        "data.train, data.val and loop.seed (or must equal them), and model must be one of the "
        "system's models",
        "properties": {
            **compound["properties"],
            # training_file and validation_file may stand for data.train and data.val
            "data": {
                "description": "the example files: train, val and optionally test (train and "
                "val may be given as training_file and validation_file instead)",
                "anyOf": [
                    {"$ref": f"#/components/schemas/{PREFIX}DataSplits"},
                    {"type": "object"},
                ],
            },
            **{k: openai["properties"][k] for k in COMPOUND_OPENAI_FIELDS},
        },
    }
    union = {
        "title": "JobCreate",
        "description": "a job with its system (CompoundJobCreate; the openai SDK sends it in "
        "extra_body) or OpenAI's single-model job (OpenAIJobCreate)",
        "oneOf": [
            {"$ref": "#/components/schemas/CompoundJobCreate"},
            {"$ref": f"#/components/schemas/{OPENAI_PREFIX}JobCreate"},
        ],
    }
    return {
        **defs,
        f"{OPENAI_PREFIX}JobCreate": openai,
        "CompoundJobCreate": compound,
        "JobCreate": union,
    }


def install(app: FastAPI) -> None:
    """Add the spec's schemas to the app's OpenAPI document (built once, on first request)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            document.setdefault("components", {}).setdefault("schemas", {}).update(
                {**job_spec_schemas(), **job_create_schemas()}
            )
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
