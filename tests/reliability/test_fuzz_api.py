"""Fuzzing the API, bounded for the default suite: nothing a client sends may answer 5xx.

Three generators, each derandomized (the same requests on every machine, so a failure here
reproduces anywhere), against the live API of ``tests/live_api.py`` (PostgreSQL, real uploads):

- schemathesis over every operation, from the OpenAPI document (the typed job body of
  finding 10), with a live key;
- schemathesis over the operations that take an id, with the id of a real job or file of the
  caller (fresh for each request, so a generated DELETE cannot starve the others), so that the
  generated cursors, names and query values reach the handlers behind the id lookup;
- a mutation fuzzer over ``POST /v1/jobs`` and ``/v1/jobs/quote``: a valid tiny-kb job over the
  caller's real files with one to three parts replaced, removed or added. Where the answer is
  200 the job exists and is listed; where it is 422 the error names a ``param`` and no job was
  written. Run with ``--hypothesis-show-statistics`` to see how many were accepted.

The long form (thousands of cases, the probe's 3,072) is ``schemathesis run`` against a
server; this is the regression guard.
"""

from __future__ import annotations

import collections
import json
from typing import Any

import schemathesis
from conftest import tiny_job_spec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from live_api import LiveApi

from cotune.settings import Settings
from services.api.app import create_app

EXAMPLES_PER_OPERATION = 12
MUTATED_JOBS = 150

FUZZ = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
# The document, from an app that serves nothing (schemathesis needs it at collection time);
# the requests go to the live app.
schema = schemathesis.openapi.from_dict(
    create_app(Settings(database_url="sqlite://", migrate_on_start=False)).openapi()
)


def send(live: LiveApi, case: Any) -> Any:
    """A generated request, sent to the live app as the caller (acme)."""
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    kwargs["headers"].update(live.tenants["acme"].headers)
    if not kwargs.get("cookies"):
        kwargs.pop("cookies", None)  # per-request cookies are deprecated in the test client
    if isinstance(kwargs.get("data"), bytes | str):  # raw bodies are httpx's ``content``
        kwargs["content"] = kwargs.pop("data")
    if kwargs.get("files"):  # requests-style parts; httpx wants each part's content as bytes
        kwargs["files"] = [
            (name, (filename, _part_bytes(content)))
            for name, (filename, content) in kwargs["files"]
        ]
    response = live.client.request(**kwargs)
    assert response.status_code < 500, (case.method, case.formatted_path, response.text[:500])
    return response


def _part_bytes(content: Any) -> bytes:
    if isinstance(content, bytes):
        return content
    return (content if isinstance(content, str) else json.dumps(content)).encode("utf-8", "replace")


@schema.parametrize()
@FUZZ
def test_no_operation_answers_5xx(case: Any, live: LiveApi) -> None:
    send(live, case)


def _fresh_job(live: LiveApi) -> str:
    acme = live.tenants["acme"]
    response = live.client.post("/v1/jobs", headers=acme.headers, json=tiny_job_spec(acme.files))
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def _fresh_file(live: LiveApi) -> str:
    response = live.client.post(
        "/v1/files",
        headers=live.tenants["acme"].headers,
        files={"file": ("rows.jsonl", b'{"question": "q", "expected": "a"}\n')},
        data={"purpose": "data"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


@schema.include(path_regex=r"\{(job_id|file_id)\}").parametrize()
@FUZZ
def test_operations_on_real_ids_never_answer_5xx(case: Any, live: LiveApi) -> None:
    params = case.path_parameters
    if "job_id" in params:
        params["job_id"] = _fresh_job(live)
        if str((case.query or {}).get("stream")).lower() in ("true", "1", "yes", "on"):
            # A stream follows its job until the job ends, and nothing runs this one.
            cancel = f"/v1/jobs/{params['job_id']}/cancel"
            assert live.client.post(cancel, headers=live.tenants["acme"].headers).is_success
    if "file_id" in params:
        params["file_id"] = _fresh_file(live)
    send(live, case)


# -- mutations of a valid job ------------------------------------------------------------------

LEAVES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def _like(value: Any) -> st.SearchStrategy[Any]:
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(min_value=0, max_value=64)
    if isinstance(value, float):
        return st.floats(min_value=0.0, max_value=1.0)
    if isinstance(value, str):
        return st.text(min_size=1, max_size=40)
    return LEAVES


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON value (dict keys and list indices), the value's own path first."""
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _paths(value, (*prefix, i))
    return found


@st.composite
def mutated_jobs(draw: st.DrawFn, files: dict[str, str]) -> dict[str, Any]:
    spec = tiny_job_spec(files)
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        path = draw(st.sampled_from(_paths(spec)[1:]))
        *parents, last = path
        node: Any = spec
        for key in parents:
            node = node[key]
        how = draw(st.sampled_from(["perturb", "perturb", "replace", "remove", "add"]))
        if how == "perturb":  # a value of the same type: valid more often than not
            node[last] = draw(_like(node[last]))
        elif how == "replace":
            node[last] = draw(LEAVES)
        elif how == "remove":
            del node[last]
        elif isinstance(node, dict):
            node[draw(st.text(min_size=1, max_size=12))] = draw(LEAVES)
        else:
            node.append(draw(LEAVES))
        event(f"mutation: {how}")
    return spec


def test_mutated_jobs_answer_200_or_422_naming_the_field(live: LiveApi) -> None:
    acme = live.tenants["acme"]
    outcomes: collections.Counter[int] = collections.Counter()

    @settings(FUZZ, max_examples=MUTATED_JOBS)
    @given(mutated_jobs(acme.files))
    def check(spec: dict[str, Any]) -> None:
        body = json.dumps(spec).encode()
        headers = {**acme.headers, "content-type": "application/json"}
        quote = live.client.post("/v1/jobs/quote", content=body, headers=headers)
        before = live.jobs_of("acme")
        created = live.client.post("/v1/jobs", content=body, headers=headers)
        for response in (quote, created):
            assert response.status_code in (200, 422), response.text[:500]
        outcomes[created.status_code] += 1
        # the quote and the creation agree on whether a job is valid
        assert quote.status_code == created.status_code, (quote.text[:300], created.text[:300])
        if created.status_code == 200:
            event("accepted")
            job = live.client.get(f"/v1/jobs/{created.json()['id']}", headers=acme.headers)
            assert job.status_code == 200 and job.json()["status"] == "queued", job.text
            assert live.jobs_of("acme") == before + 1
        else:
            event("refused")
            assert created.json()["error"]["param"], created.text
            assert live.jobs_of("acme") == before

    check()
    print(
        f"mutated jobs: {sum(outcomes.values())}, accepted {outcomes[200]}, refused {outcomes[422]}"
    )
    # the generator reaches both sides: valid jobs over real files, and near-valid ones
    assert outcomes[200] and outcomes[422], outcomes
