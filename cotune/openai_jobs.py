"""Jobs in OpenAI's shape: its fine-tuning JSONL read as examples, and its job-creation body
turned into a cotune job spec.

A single-model job (``client.fine_tuning.jobs.create(model=..., training_file=...)``) is the
one-component system ``SINGLE``: one ``chat`` component that sends each conversation to the
model as it is. Its data are OpenAI's JSONL (``data.format: openai``, files uploaded with
purpose ``fine-tune``), an example per assistant turn; its training rows are given, not
synthesized (``train.rows: given``): ``supervised`` is LoRA SFT on the assistant turns, ``dpo``
is SFT on the preferred outputs then DPO against that frozen SFT adapter. One loop epoch; the
trained adapter is the result whatever its val score (``loop.keep: last``), scored on the
validation file's assistant turns (token F1) beside the base model's.

A compound job sends its system through the SDK's ``extra_body``: the body is then a native
job spec, and OpenAI's ``training_file``, ``validation_file``, ``seed`` and ``model`` fill or
must agree with ``data.train``, ``data.val``, ``loop.seed`` and the system's models.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, ValidationError

from cotune.data import JSONL_SUFFIXES, Example, Row, iter_rows, load_examples
from cotune.errors import DataError, SpecError
from cotune.spec.job import JobSpec, TrainConfig, parse_job
from cotune.spec.refs import Split
from cotune.spec.system import COMPONENT_NAME, Float, Int, _Strict, spec_error_from

ROLES = ("system", "user", "assistant")
COMPONENT = "assistant"  # the one component of a single-model job: its adapter's name
INPUT = "messages"
OUTPUT = "reply"
MAX_TOKENS = 256  # generated tokens per evaluated turn
# What each kind of row holds, as an upload's ``fields`` counts it.
KIND_FIELD = {"chat": "messages", "preference": "preferred_output"}
RowKind = Literal["chat", "preference"]

# -- OpenAI's JSONL -> examples ---------------------------------------------------------------


def _messages(value: Any, where: str, fail: Any, *, weights: bool) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise fail(f"'{where}' must be a non-empty list of messages", where)
    checked: list[dict[str, Any]] = []
    for i, message in enumerate(value):
        at = f"{where}.{i}"
        if not isinstance(message, Mapping):
            raise fail(f"'{at}' must be an object {{role, content}}", at)
        allowed = {"role", "content", "weight"} if weights else {"role", "content"}
        for key in message:
            if key not in allowed:
                why = " (cotune trains no tool or function calls)" if "call" in str(key) else ""
                raise fail(f"'{at}.{key}': unknown field{why}", f"{at}.{key}")
        role = message.get("role")
        if role not in ROLES:
            raise fail(f"'{at}.role' must be one of {list(ROLES)}, got {role!r}", f"{at}.role")
        if not isinstance(message.get("content"), str):
            raise fail(
                f"'{at}.content' must be a string (text only), got {message.get('content')!r}",
                f"{at}.content",
            )
        weight = message.get("weight", 1)
        if "weight" in message and (role != "assistant" or weight not in (0, 1)):
            raise fail(f"'{at}.weight' must be 0 or 1 on an assistant message", f"{at}.weight")
        checked.append({"role": role, "content": message["content"], "weight": weight})
    return checked


def _plain(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _output(row: Mapping[str, Any], key: str, fail: Any) -> str:
    value = row.get(key)
    if not isinstance(value, list) or len(value) != 1:
        raise fail(f"'{key}' must be a list of one assistant message", key)
    (message,) = _messages(value, key, fail, weights=False)
    if message["role"] != "assistant":
        raise fail(f"'{key}.0.role' must be 'assistant', got {message['role']!r}", f"{key}.0.role")
    return str(message["content"])


def row_examples(
    line: int, row: Mapping[str, Any], source: str, split: str = "train"
) -> tuple[RowKind, list[Example]]:
    """One row of OpenAI's fine-tuning JSONL as examples: a chat row ``{messages}`` gives one
    per assistant turn of weight 1 (the conversation before it as the input, the turn as
    gold); a preference row ``{input: {messages}, preferred_output, non_preferred_output}``
    gives one (the preferred output as gold, the other as ``rejected``). A ``DataError``
    names the line and the field (``messages.2.content``)."""

    def fail(message: str, where: str) -> DataError:
        return DataError(message, path=source, line=line, field=where)

    if "messages" in row:
        for key in row:
            if key != "messages":
                raise fail(f"'{key}': unknown field of a chat row {{messages}}", key)
        messages = _messages(row["messages"], "messages", fail, weights=True)
        examples = [
            Example(
                id=f"{split}-{line}-{i}",
                inputs={INPUT: _plain(messages[:i])},
                expected=[m["content"]],
            )
            for i, m in enumerate(messages)
            if m["role"] == "assistant" and m["weight"] == 1
        ]
        if messages[0]["role"] == "assistant":
            raise fail("'messages.0' is an assistant turn with nothing before it", "messages.0")
        if not examples:
            raise fail("'messages' has no assistant turn (of weight 1) to train on", "messages")
        return "chat", examples
    if "input" in row:
        for key in row:
            if key not in ("input", "preferred_output", "non_preferred_output"):
                raise fail(f"'{key}': unknown field of a preference row", key)
        given = row["input"]
        if not isinstance(given, Mapping):
            raise fail("'input' must be an object {messages}", "input")
        for key in given:
            if key != "messages":
                raise fail(f"'input.{key}': unknown field", f"input.{key}")
        messages = _messages(given.get("messages"), "input.messages", fail, weights=False)
        example = Example(
            id=f"{split}-{line}",
            inputs={INPUT: _plain(messages)},
            expected=[_output(row, "preferred_output", fail)],
            rejected=_output(row, "non_preferred_output", fail),
        )
        return "preference", [example]
    raise fail(
        "a row is a chat row {messages} or a preference row {input, preferred_output, "
        f"non_preferred_output}}; got fields {sorted(row)}",
        "messages",
    )


@dataclass
class OpenAIRows:
    """A file of OpenAI's fine-tuning JSONL: its kind, its rows and its examples."""

    kind: RowKind
    rows: int
    examples: list[Example] = field(default_factory=list)


def read_openai_rows(rows: Iterable[Row], source: str, split: str = "train") -> OpenAIRows:
    """Every row checked (``row_examples``), all of one kind; ``DataError`` otherwise."""
    kind: RowKind | None = None
    first = 0
    examples: list[Example] = []
    n = 0
    for line, row in rows:
        row_kind, found = row_examples(line, row, source, split)
        if kind is None:
            kind, first = row_kind, line
        elif row_kind != kind:
            raise DataError(
                f"a {row_kind} row in a file of {kind} rows (line {first} is one)",
                path=source,
                line=line,
                field=KIND_FIELD[row_kind],
            )
        examples.extend(found)
        n += 1
    if kind is None:
        raise DataError("no rows", path=source)
    return OpenAIRows(kind=kind, rows=n, examples=examples)


def load_split(job: JobSpec, split: Split) -> list[Example]:
    """A job's split as examples, read as its ``data.format`` says (none for an unset one)."""
    path = job.data_path(split)
    if path is None:
        return []
    if job.data.format != "openai":
        return load_examples(path, job.system, split=split)
    if path.suffix.lower() not in JSONL_SUFFIXES:
        raise DataError("OpenAI's fine-tuning data is a .jsonl file", path=str(path))
    return read_openai_rows(iter_rows(path), str(path), split).examples


# -- OpenAI's job-creation body -> a job spec ------------------------------------------------

Auto = Literal["auto"]


class Hyperparameters(_Strict):
    """OpenAI's hyperparameters; ``auto`` keeps cotune's default."""

    n_epochs: Int | Auto = Field(default="auto", description="-> train.epochs (passes over rows)")
    batch_size: Int | Auto = Field(default="auto", description="-> train.batch_size")
    learning_rate_multiplier: Float | Auto = Field(
        default="auto", description="-> train.learning_rate = 1e-4 x this"
    )


class DpoHyperparameters(Hyperparameters):
    beta: Float | Auto = Field(default="auto", description="-> train.dpo_beta")


class SupervisedMethod(_Strict):
    hyperparameters: Hyperparameters | None = None


class DpoMethod(_Strict):
    hyperparameters: DpoHyperparameters | None = None


class Method(_Strict):
    type: Literal["supervised", "dpo"] = Field(
        description="supervised: LoRA SFT on the assistant turns; dpo: SFT on the preferred "
        "outputs, then DPO (OpenAI's reinforcement method is not offered)"
    )
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


class OpenAIJobCreate(_Strict):
    """A single-model job as OpenAI's ``POST /v1/fine_tuning/jobs`` takes it."""

    model: str = Field(description="a registered base model (GET /v1/models)")
    training_file: str = Field(description="a file id, uploaded with purpose fine-tune")
    validation_file: str | None = Field(
        default=None, description="a file id (purpose fine-tune); required: it scores the model"
    )
    method: Method | None = Field(default=None, description="default: supervised")
    hyperparameters: Hyperparameters | None = Field(
        default=None, description="OpenAI's deprecated place for method's hyperparameters"
    )
    suffix: str | None = Field(
        default=None,
        max_length=64,
        pattern=COMPONENT_NAME,
        description="names the job: <model>-<suffix> (letters, digits, '_' and '-')",
    )
    seed: Int | None = Field(default=None, ge=0, le=2**31 - 1, description="-> loop.seed")
    metadata: dict[str, str] | None = Field(default=None, description="not stored: must be empty")
    integrations: list[Any] | None = Field(default=None, description="none run: must be empty")


OPENAI_FIELDS = tuple(OpenAIJobCreate.model_fields)


@dataclass
class BuiltJob:
    """A native job spec and, for errors, which request field each of its fields came from."""

    spec: dict[str, Any]
    origin: dict[str, str] = field(default_factory=dict)

    def renamed(self, err: SpecError) -> SpecError:
        """``err`` naming the request's field (``training_file``), not the spec's."""
        param = err.param or ""
        for inner, outer in self.origin.items():
            if param == inner or param.startswith(inner + "."):
                message = err.message.replace(inner, outer, 1)
                return SpecError(message, param=outer + param[len(inner) :])
        return err


def job_spec_from_request(body: Any) -> BuiltJob:
    """The native job spec of a create body: a single-model job in OpenAI's shape, or a job
    spec (a ``system``, as the SDK's ``extra_body`` sends it) with OpenAI's fields beside it.
    Raises ``SpecError`` naming the request's field. The files and the model are checked
    later, against the caller's files and the server's registry (the API's policy): pass
    that check's errors through ``BuiltJob.renamed``."""
    if not isinstance(body, Mapping):
        raise SpecError("a job must be a JSON object")
    if "system" in body or not {"model", "training_file"} & set(body):
        return _compound(body)  # a spec (a spec without a system is refused naming it)
    try:
        request = OpenAIJobCreate.model_validate(body)
    except ValidationError as err:
        raise spec_error_from(err) from None
    return _single(request)


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for key in ("metadata", "integrations"):
        if body.get(key):
            what = "stores no metadata" if key == "metadata" else "runs no integrations"
            raise SpecError(f"{key}: cotune {what}; leave it out", param=key)


def _compound(body: Mapping[str, Any]) -> BuiltJob:
    spec = {k: v for k, v in body.items() if k not in OPENAI_FIELDS}
    given = {k: body[k] for k in OPENAI_FIELDS if body.get(k) is not None}
    if not given:
        return BuiltJob(spec=dict(body))
    _refuse_unsupported(body)
    for key in ("hyperparameters", "method", "suffix"):
        if key in given:
            raise SpecError(
                f"{key}: a job with a system sets its training in 'train' and 'loop' (and is "
                "named by its system); leave it out",
                param=key,
            )
    for key, section, inner in [
        ("training_file", "data", "train"),
        ("validation_file", "data", "val"),
        ("seed", "loop", "seed"),
    ]:
        if key not in given:
            continue
        part = spec.get(section)
        part = dict(part) if isinstance(part, Mapping) else {}
        if part.get(inner, given[key]) != given[key]:
            raise SpecError(
                f"{key}: {given[key]!r} differs from {section}.{inner} {part[inner]!r}; give it "
                "once",
                param=key,
            )
        part[inner] = given[key]
        spec[section] = part
    if "model" in given:
        system = body["system"]
        models = system.get("models") if isinstance(system, Mapping) else None
        names = [
            ref.get("name")
            for ref in (models.values() if isinstance(models, Mapping) else [])
            if isinstance(ref, Mapping)
        ]
        if given["model"] not in names:
            raise SpecError(
                f"model: {given['model']!r} is none of the system's models {names}",
                param="model",
            )
    return BuiltJob(spec=spec)


def _hyperparameters(request: OpenAIJobCreate) -> tuple[Hyperparameters | None, str]:
    method = request.method or Method(type="supervised")
    inner = method.dpo if method.type == "dpo" else method.supervised
    other = "supervised" if method.type == "dpo" else "dpo"
    if getattr(method, other) is not None:
        raise SpecError(
            f"method.{other}: the method's type is {method.type!r}", param=f"method.{other}"
        )
    nested = inner.hyperparameters if inner is not None else None
    if nested is not None and request.hyperparameters is not None:
        raise SpecError(
            f"hyperparameters: also given as method.{method.type}.hyperparameters; give them "
            "once (OpenAI deprecated the top-level field)",
            param="hyperparameters",
        )
    if nested is not None:
        return nested, f"method.{method.type}.hyperparameters"
    return request.hyperparameters, "hyperparameters"


def _single(request: OpenAIJobCreate) -> BuiltJob:
    _refuse_unsupported(request.model_dump())
    if request.validation_file is None:
        raise SpecError(
            "validation_file: cotune scores the trained model on a validation file (its "
            "assistant turns as gold); upload one with purpose fine-tune",
            param="validation_file",
        )
    dpo = request.method is not None and request.method.type == "dpo"
    hyper, where = _hyperparameters(request)
    train: dict[str, Any] = {"method": "sft+dpo" if dpo else "sft", "rows": "given"}
    origin = {
        "data.train": "training_file",
        "data.val": "validation_file",
        "system.models.base.name": "model",
        "system.name": "suffix",
        "loop.seed": "seed",
    }
    if hyper is not None:
        values = hyper.model_dump()
        base_rate = TrainConfig.model_fields["learning_rate"].default
        for name, key in [
            ("n_epochs", "epochs"),
            ("batch_size", "batch_size"),
            ("learning_rate_multiplier", "learning_rate"),
            ("beta", "dpo_beta"),
        ]:
            value = values.get(name, "auto")
            if value == "auto":
                continue
            if key == "learning_rate":
                value = value * base_rate
                if not 0 < value < 1:
                    raise SpecError(
                        f"{where}.{name}: {values[name]} times cotune's learning rate "
                        f"{base_rate} is {value}; it must lie in (0, 1)",
                        param=f"{where}.{name}",
                    )
            train[key] = value
            origin[f"train.{key}"] = f"{where}.{name}"
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.model).strip("-_") or "model"
    spec: dict[str, Any] = {
        "system": {
            "name": f"{name}-{request.suffix}" if request.suffix else name,
            "inputs": [INPUT],
            "output": OUTPUT,
            "models": {"base": {"name": request.model}},
            "components": [
                {
                    "name": COMPONENT,
                    "kind": "llm",
                    "model": "base",
                    "reads": [INPUT],
                    "writes": OUTPUT,
                    "chat": True,
                    "max_tokens": MAX_TOKENS,
                }
            ],
            "metric": "f1",
        },
        "data": {
            "train": request.training_file,
            "val": request.validation_file,
            "format": "openai",
        },
        # One pass of the loop: the rows are given, so no judge, no candidates, no replays.
        "loop": {
            "epochs": 1,
            "keep": "last",
            "gold_candidates": False,
            "resample_candidates": 0,
            "augment_rollouts": 0,
        },
        "train": train,
    }
    if request.seed is not None:
        spec["loop"]["seed"] = request.seed
    built = BuiltJob(spec=spec, origin=origin)
    try:
        parse_job(spec)
    except SpecError as err:
        raise built.renamed(err) from None
    return built
