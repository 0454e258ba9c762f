"""The bad-input corpus (``tests/data/bad/``): every request there must answer the 4xx its
case names, with ``param`` naming the bad part where the case gives one, and write nothing.

- ``specs.jsonl``: changes to a valid tiny-kb job over real uploaded files (``set`` a dotted
  path to a value, or ``splice`` raw JSON text, such as ``\\ud800`` or ``NaN``, that Python's
  own encoder would never write), or a raw ``body``; each is sent to ``POST /v1/jobs``,
  ``/v1/jobs/quote`` and ``/v1/fine_tuning/jobs``.
- ``requests.jsonl``: ids, cursors, paging, traversal, other tenants' ids, headers, keys.
  ``{job}`` is the caller's job, ``{other_job}`` / ``{other_file}`` another tenant's.
- ``uploads/`` with ``uploads.json``: files whose upload must answer 422 naming the line and
  the field (``param`` ``line N.field``, or ``line N`` where the whole line is bad).

The probe's findings each have at least one case here (their ``finding`` number).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_job_spec
from live_api import LiveApi

BAD = Path(__file__).resolve().parents[1] / "data" / "bad"
MARKER = "SPLICE-HERE-7f3a"
JOB_ROUTES = ("/v1/jobs", "/v1/jobs/quote", "/v1/fine_tuning/jobs")


def _cases(name: str) -> list[Any]:
    rows = [json.loads(line) for line in (BAD / name).read_text().splitlines() if line]
    return [pytest.param(row, id=row["case"]) for row in rows]


def _set(spec: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node: Any = spec
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _get(spec: dict[str, Any], dotted: str) -> Any:
    node: Any = spec
    for key in dotted.split("."):
        node = node[int(key)] if isinstance(node, list) else node.get(key)
    return node


def spec_body(case: dict[str, Any], files: dict[str, str]) -> bytes:
    """The request body a spec case describes, over the caller's real files."""
    if "body" in case:
        return str(case["body"]).encode()
    spec = tiny_job_spec(files)
    for dotted, value in case.get("set", {}).items():
        _set(spec, dotted, value)
    splice = case.get("splice")
    if splice is None:
        return json.dumps(spec).encode()
    if splice["into"] == "string":  # the raw text goes inside the string already there
        _set(spec, splice["at"], f"{_get(spec, splice['at']) or ''}{MARKER}")
        text = json.dumps(spec).replace(MARKER, splice["raw"])
    else:  # the raw text is the whole value
        _set(spec, splice["at"], MARKER)
        text = json.dumps(spec).replace(f'"{MARKER}"', splice["raw"])
    return text.encode()


def assert_error(response: Any, expect: dict[str, Any]) -> None:
    assert response.status_code == expect["status"], response.text[:500]
    error = response.json()["error"]
    assert error["message"], error
    if "param" in expect:
        assert error["param"] == expect["param"], error
    if "param_prefix" in expect:
        assert (error["param"] or "").startswith(expect["param_prefix"]), error


@pytest.mark.parametrize("case", _cases("specs.jsonl"))
def test_a_bad_spec_answers_4xx_naming_the_field_and_writes_nothing(
    live: LiveApi, case: dict[str, Any]
) -> None:
    acme = live.tenants["acme"]
    jobs, dispatched = live.jobs_of("acme"), len(live.dispatcher.dispatched)
    body = spec_body(case, acme.files)
    headers = {**acme.headers, "content-type": "application/json"}
    for route in JOB_ROUTES:
        response = live.client.post(route, content=body, headers=headers)
        assert_error(response, case["expect"])
    assert live.jobs_of("acme") == jobs
    assert len(live.dispatcher.dispatched) == dispatched
    assert live.client.get("/v1/jobs?limit=100", headers=acme.headers).status_code == 200


@pytest.mark.parametrize("case", _cases("requests.jsonl"))
def test_a_bad_request_answers_4xx_and_writes_nothing(live: LiveApi, case: dict[str, Any]) -> None:
    acme, globex = live.tenants["acme"], live.tenants["globex"]
    path = case["path"].format(job=acme.job, other_job=globex.job, other_file=globex.files["train"])
    headers = dict(acme.headers)
    if "auth" in case:
        headers.pop("Authorization")
        if case["auth"] is not None:
            headers["Authorization"] = f"Bearer {case['auth']}"
    headers.update(case.get("headers", {}))
    kwargs: dict[str, Any] = {}
    if case.get("spec"):
        kwargs["json"] = tiny_job_spec(acme.files)
    elif "body" in case:
        kwargs["content"] = case["body"].encode()
    elif "upload" in case:
        upload = case["upload"]
        kwargs["files"] = {"file": (upload["name"], upload["content"].encode())}
        if "purpose" in upload:
            kwargs["data"] = {"purpose": upload["purpose"]}
    before = {t: (live.jobs_of(t), live.files_of(t)) for t in live.tenants}
    statuses = {t: live.store.get_job(x.job).status for t, x in live.tenants.items()}
    response = live.client.request(case["method"], path, headers=headers, **kwargs)
    assert_error(response, case["expect"])
    assert {t: (live.jobs_of(t), live.files_of(t)) for t in live.tenants} == before
    assert {t: live.store.get_job(x.job).status for t, x in live.tenants.items()} == statuses


UPLOADS: dict[str, dict[str, Any]] = json.loads((BAD / "uploads.json").read_text())


@pytest.mark.parametrize("name", sorted(UPLOADS))
def test_a_bad_upload_answers_422_naming_line_and_field(live: LiveApi, name: str) -> None:
    acme = live.tenants["acme"]
    expect = UPLOADS[name]
    files = live.files_of("acme")
    response = live.client.post(
        "/v1/files",
        headers=acme.headers,
        files={"file": (name, (BAD / "uploads" / name).read_bytes())},
        data={"purpose": expect["purpose"]},
    )
    assert_error(response, {"status": 422, "param": expect["param"]})
    assert response.json()["error"]["code"] == "invalid_file"
    assert f"line {expect['line']}" in response.json()["error"]["message"]
    assert live.files_of("acme") == files
