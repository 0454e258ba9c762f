"""The OpenAPI document with a typed job spec: ``POST /v1/jobs`` and ``/quote`` take a JSON
object that the route checks itself (``policy.check_job_for_http``, errors that name the
field), and the document describes it with the spec's own models (``cotune.spec``), so a
fuzzer or an SDK generator can build a valid job from the schema."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from cotune.spec.job import JobSpec

PREFIX = "Spec"  # the spec's models beside the API's own (``Component`` vs ``ComponentObject``)
JOB_SPEC_REF = f"#/components/schemas/{PREFIX}JobSpec"
# On a route: its request body is the typed job spec (FastAPI merges this into the operation).
JOB_SPEC_BODY: dict[str, Any] = {
    "requestBody": {"content": {"application/json": {"schema": {"$ref": JOB_SPEC_REF}}}}
}
# What only a local job file may hold: never over HTTP.
LOCAL_ONLY = ("base_dir",)


def job_spec_schemas() -> dict[str, Any]:
    """The job spec's JSON schemas by component name, the job itself as ``SpecJobSpec``."""
    schema = JobSpec.model_json_schema(ref_template=f"#/components/schemas/{PREFIX}{{model}}")
    defs = schema.pop("$defs", {})
    for name in LOCAL_ONLY:
        schema["properties"].pop(name, None)
    return {f"{PREFIX}{name}": value for name, value in {**defs, "JobSpec": schema}.items()}


def install(app: FastAPI) -> None:
    """Add the spec's schemas to the app's OpenAPI document (built once, on first request)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            document.setdefault("components", {}).setdefault("schemas", {}).update(
                job_spec_schemas()
            )
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
