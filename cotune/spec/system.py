"""System and job specs: typed, loaded from YAML or JSON, validated with errors that teach.

A system is a DAG of components. Each ``llm`` component renders a ``str.format`` prompt from the
fields it reads and writes one field; each ``tool`` component calls an allow-listed tool. The
checks here are structural (graph, templates, names); data files are checked in ``data.py``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cotune.errors import SpecError
from cotune.spec.tools import ToolArgError, check_tool_args

IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"
COMPONENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
NAME_MAX = 255  # system and component names are stored in varchar(255) columns
# Set by the loader from where a file was read; a spec that sets it is refused (unknown field).
LOADER_ONLY = ("base_dir",)
JUDGE_PASS_THRESHOLD = 0.5  # pass_threshold's default with metric judge


def _not_a_bool(value: Any) -> Any:
    """pydantic reads JSON ``true`` as 1 for an int field; a count or a rate is never a bool."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


Int = Annotated[int, BeforeValidator(_not_a_bool)]
Float = Annotated[float, BeforeValidator(_not_a_bool)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def refuse_loader_fields(data: Any) -> None:
    """``base_dir`` is the loader's, not the user's: refuse it as the unknown field it is."""
    if isinstance(data, dict):
        for key in LOADER_ONLY:
            if key in data:
                raise SpecError(f"{key}: unknown field", param=key)


class ModelRef(_Strict):
    """A base model: a registry ``name`` or, in the embedded mode only, a local ``path``."""

    name: str | None = Field(
        default=None, description="a registry model (`cotune models list`, GET /v1/models)"
    )
    path: str | None = Field(
        default=None,
        description="a local model folder, relative to the system file's folder; the embedded "
        "mode and `cotune run` only (a server runs registry models)",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelRef:
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of 'name' (a registry name) or 'path'")
        return self


class JsonOutput(_Strict):
    """Structured output: the component's text must be JSON following ``json`` (a JSON schema)."""

    json_schema: dict[str, Any] = Field(
        alias="json", description="the JSON schema the output must follow (key: json)"
    )


class Component(_Strict):
    name: str = Field(
        pattern=COMPONENT_NAME,
        max_length=NAME_MAX,
        description="unique in the system; names its adapter and its spans in traces",
    )
    kind: Literal["llm", "tool"] = Field(
        description="llm: a prompted model (trainable); tool: bm25, http_search or python"
    )
    reads: list[str] = Field(
        min_length=1, description="the fields it takes: system inputs or other components' writes"
    )
    writes: str = Field(pattern=IDENTIFIER, description="the one field it writes")
    # llm components
    model: str | None = Field(default=None, description="llm: an alias declared in 'models'")
    prompt: str | None = Field(
        default=None, description="llm: a str.format template over the fields it reads"
    )
    system: str | None = Field(
        default=None, description="llm: an optional system message, a template like 'prompt'"
    )
    chat: bool = Field(
        default=False,
        description="llm: the one field it reads holds a conversation, a list of {role, content} "
        "messages (OpenAI's chat format), sent to the model as it is instead of a prompt",
    )
    trainable: bool | None = Field(
        default=None, description="llm: false keeps it frozen (no adapter); default trainable"
    )
    output: Literal["text"] | JsonOutput = Field(
        default="text", description="llm: 'text', or {json: SCHEMA} for structured output"
    )
    max_tokens: Int = Field(default=64, ge=1, le=8192, description="llm: generated tokens at most")
    temperature: Float = Field(
        default=0.0, ge=0.0, le=2.0, description="llm: sampling temperature (0 is greedy)"
    )
    # tool components
    tool: str | None = Field(default=None, description="tool: bm25, http_search or python")
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="tool: bm25 {corpus, k}, http_search {url, k}, python {function} "
        "(rules: cotune/spec/tools.py)",
    )

    @field_validator("reads")
    @classmethod
    def _reads_are_fields(cls, reads: list[str]) -> list[str]:
        import re

        for field in reads:
            if not re.match(IDENTIFIER, field):
                raise ValueError(f"{field!r} is not a field name (letters, digits, '_')")
        if len(set(reads)) != len(reads):
            raise ValueError("lists a field twice")
        return reads

    @property
    def is_trainable(self) -> bool:
        return self.kind == "llm" and self.trainable is not False

    @property
    def json_schema(self) -> dict[str, Any] | None:
        return self.output.json_schema if isinstance(self.output, JsonOutput) else None


class SystemSpec(_Strict):
    name: str = Field(
        pattern=COMPONENT_NAME, max_length=NAME_MAX, description="names the job's outputs"
    )
    description: str = Field(default="", description="free text for people")
    inputs: list[str] = Field(min_length=1, description="the fields each data row gives")
    output: str = Field(description="the field the metric scores (some component writes it)")
    models: dict[str, ModelRef] = Field(
        default_factory=dict, description="alias -> base model, used by the llm components"
    )
    components: list[Component] = Field(
        min_length=1, description="the DAG's nodes, in any order (each reads, each writes)"
    )
    metric: str = Field(
        default="exact_match",
        description="exact_match, f1, contains, list_equal, judge or a registered metric",
    )
    pass_threshold: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="a trace whose score reaches this passes (default 1.0; 0.5 with metric "
        "judge, whose scores are rarely exactly 1)",
    )
    rubric: str | None = Field(
        default=None,
        min_length=1,
        max_length=4000,
        description="metric judge only, and required there: what a good final output is; the "
        "judge scores each output 0-1 against it (gold, where a row has it, is a reference)",
    )

    # Set by the loader, never serialised (a spec that sets it is refused).
    base_dir: Path | None = Field(
        default=None,
        exclude=True,
        description="where relative paths (corpora, models by path) resolve",
    )

    @model_validator(mode="after")
    def _check_graph(self) -> SystemSpec:
        check_system(self)
        return self

    # -- graph helpers -------------------------------------------------------------------------
    def component(self, name: str) -> Component:
        for component in self.components:
            if component.name == name:
                return component
        raise KeyError(f"system {self.name!r} has no component {name!r}")

    @property
    def llm_components(self) -> list[Component]:
        return [c for c in self.components if c.kind == "llm"]

    @property
    def trainable_components(self) -> list[Component]:
        return [c for c in self.components if c.is_trainable]

    def writer_of(self, field: str) -> Component | None:
        return next((c for c in self.components if c.writes == field), None)

    def levels(self) -> list[list[Component]]:
        """Components grouped by topological level; a level only reads earlier levels' fields."""
        depth: dict[str, int] = {}
        for component in topological_order(self):
            parents = [self.writer_of(f) for f in component.reads]
            depth[component.name] = 1 + max((depth[p.name] for p in parents if p), default=-1)
        grouped: list[list[Component]] = [[] for _ in range(max(depth.values()) + 1)]
        for component in self.components:
            grouped[depth[component.name]].append(component)
        return grouped

    def downstream(self, name: str) -> list[str]:
        """Names of the components that (transitively) read what ``name`` writes, in order."""
        tainted = {self.component(name).writes}
        found: list[str] = []
        for component in topological_order(self):
            if component.name != name and tainted.intersection(component.reads):
                tainted.add(component.writes)
                found.append(component.name)
        return found

    def resolve_path(self, relative: str) -> Path:
        path = Path(relative)
        if path.is_absolute() or self.base_dir is None:
            return path
        return self.base_dir / path


def template_fields(template: str) -> list[str]:
    """The placeholders of a ``str.format`` template; refuses anything but plain names."""
    import re

    fields: list[str] = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if name == "" or not re.match(IDENTIFIER, name):
            raise ValueError(
                f"placeholder {{{name}}} is not a plain field name "
                "(no attribute, index or positional access)"
            )
        if spec or conversion:
            raise ValueError(f"placeholder {{{name}}} may not use a format spec or conversion")
        fields.append(name)
    return fields


def topological_order(system: SystemSpec) -> list[Component]:
    """Kahn's algorithm over the field graph, stable in declaration order."""
    available = set(system.inputs)
    pending = list(system.components)
    ordered: list[Component] = []
    while pending:
        ready = [c for c in pending if all(f in available for f in c.reads)]
        if not ready:
            break
        for component in ready:
            ordered.append(component)
            available.add(component.writes)
            pending.remove(component)
    return ordered


def check_system(system: SystemSpec) -> None:
    """Graph and template checks; each error names the component and the field."""
    from cotune.metrics import known_metrics
    from cotune.tools.registry import known_python_tools

    names = [c.name for c in system.components]
    for name in names:
        if names.count(name) > 1:
            raise SpecError(f"two components are named {name!r}", param="components")
    if len(set(system.inputs)) != len(system.inputs):
        raise SpecError("'inputs' lists a field twice", param="inputs")

    writers: dict[str, str] = {f: "<input>" for f in system.inputs}
    for c in system.components:
        if c.writes in writers:
            first = writers[c.writes]
            what = "is a system input" if first == "<input>" else f"is also written by {first!r}"
            raise SpecError(
                f"component {c.name!r}: field 'writes': {c.writes!r} {what}; "
                "each field has one writer",
                param=f"components.{c.name}.writes",
            )
        writers[c.writes] = c.name

    for c in system.components:
        _check_component(system, c, writers, known_python_tools())

    ordered = topological_order(system)
    if len(ordered) < len(system.components):
        raise _cycle_error(system, [c for c in system.components if c not in ordered])
    if system.output not in writers or writers[system.output] == "<input>":
        raise SpecError(f"'output': no component writes {system.output!r}", param="output")
    if system.metric not in known_metrics():
        raise SpecError(
            f"'metric': unknown metric {system.metric!r}; known: {sorted(known_metrics())}",
            param="metric",
        )
    _check_rubric(system)


def _check_rubric(system: SystemSpec) -> None:
    """A rubric goes with ``metric: judge`` and only with it; a judged system without a
    threshold of its own passes at 0.5."""
    from cotune.metrics import JUDGE

    if system.metric == JUDGE:
        if system.rubric is None or not system.rubric.strip():
            raise SpecError(
                "field 'rubric' is required with metric 'judge': say what a good final "
                f'output ({system.output!r}) is, e.g. rubric: "answers the question in a few '
                'words, with a fact from the passages"; the judge scores each output 0-1 '
                "against it",
                param="rubric",
            )
        if "pass_threshold" not in system.model_fields_set:
            system.pass_threshold = JUDGE_PASS_THRESHOLD
    elif system.rubric is not None:
        raise SpecError(
            f"field 'rubric' is only for metric 'judge'; metric {system.metric!r} scores the "
            "output against each row's 'expected' (drop 'rubric', or set metric: judge to "
            "have the judge score outputs against it)",
            param="rubric",
        )


def _cycle_error(system: SystemSpec, stuck: list[Component]) -> SpecError:
    """Name the cycle itself, not the components merely waiting downstream of it."""
    cycle = list(stuck)
    while True:
        read = {f for c in cycle for f in c.reads}
        kept = [c for c in cycle if c.writes in read]
        if len(kept) == len(cycle):
            break
        cycle = kept
    first = cycle[0]
    waits_on = next(f for f in first.reads if any(c.writes == f for c in cycle))
    writer = next(c.name for c in cycle if c.writes == waits_on)
    return SpecError(
        f"component {first.name!r}: field 'reads': {waits_on!r} is written by {writer!r}, "
        f"which depends on {first.name!r}: components {[c.name for c in cycle]} form a cycle",
        param=f"components.{first.name}.reads",
    )


def _check_component(
    system: SystemSpec, c: Component, writers: dict[str, str], python_tools: set[str]
) -> None:
    where = f"component {c.name!r}"
    param = f"components.{c.name}"
    for field in c.reads:
        if field not in writers:
            raise SpecError(
                f"{where}: field 'reads': {field!r} is read before any component writes it "
                f"(inputs: {system.inputs})",
                param=f"{param}.reads",
            )
    if c.kind == "llm":
        if c.model is None:
            raise SpecError(
                f"{where}: field 'model' is required for an llm component", param=f"{param}.model"
            )
        if c.model not in system.models:
            raise SpecError(
                f"{where}: field 'model': unknown model {c.model!r}; "
                f"declared in 'models': {sorted(system.models)}",
                param=f"{param}.model",
            )
        if c.chat:
            _check_chat_component(c, where, param)
        elif not c.prompt:
            raise SpecError(
                f"{where}: field 'prompt' is required for an llm component", param=f"{param}.prompt"
            )
        if c.tool is not None or c.args:
            raise SpecError(
                f"{where}: 'tool' and 'args' belong to tool components", param=f"{param}.tool"
            )
        for key in ("prompt", "system"):
            template = getattr(c, key)
            if template is None:
                continue
            try:
                placeholders = template_fields(template)
            except ValueError as err:
                raise SpecError(f"{where}: field {key!r}: {err}", param=f"{param}.{key}") from err
            for name in placeholders:
                if name not in c.reads:
                    raise SpecError(
                        f"{where}: field {key!r}: placeholder {{{name}}} is not in 'reads' "
                        f"{c.reads}",
                        param=f"{param}.{key}",
                    )
    else:
        llm_only = {
            "model",
            "prompt",
            "system",
            "chat",
            "trainable",
            "output",
            "max_tokens",
            "temperature",
        }
        # Set *and* different from the default: a spec dumped with its defaults reloads.
        given = {
            k
            for k in llm_only & c.model_fields_set
            if getattr(c, k) != Component.model_fields[k].default
        }
        for key in sorted(given):
            raise SpecError(
                f"{where}: field {key!r} belongs to llm components", param=f"{param}.{key}"
            )
        try:
            check_tool_args(c.tool, c.args)
        except ToolArgError as err:
            raise SpecError(f"{where}: {err}", param=f"{param}.{err.field}") from None
        if c.tool == "python" and c.args["function"] not in python_tools:
            raise SpecError(
                f"{where}: field 'args.function': {c.args['function']!r} is not a registered "
                f"python tool; registered: {sorted(python_tools)}",
                param=f"{param}.args.function",
            )


def _check_chat_component(c: Component, where: str, param: str) -> None:
    """A chat component sends its one field's messages as they are: no template to render."""
    if len(c.reads) != 1:
        raise SpecError(
            f"{where}: field 'reads': a chat component reads one field (the conversation), "
            f"got {c.reads}",
            param=f"{param}.reads",
        )
    for key in ("prompt", "system"):
        if getattr(c, key) is not None:
            raise SpecError(
                f"{where}: field {key!r}: a chat component sends its conversation as it is; "
                "it has no template",
                param=f"{param}.{key}",
            )


# -- loading ----------------------------------------------------------------------------------


def read_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON file that must hold a mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise SpecError(f"{path}: no such file") from err
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise SpecError(f"{path}: cannot be read: {err.strerror}") from err
    try:
        loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise SpecError(f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {err}") from err
    if not isinstance(loaded, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    return loaded


def spec_error_from(err: ValidationError, prefix: str = "") -> SpecError:
    """Turn pydantic's error into one SpecError naming the field (and component, if any)."""
    errors = err.errors()
    first = errors[0]
    # For `output: {json: ...}` the union's first branch ('text') fails first; the dict branch
    # says what is really wrong.
    if first["type"] == "literal_error" and "output" in first["loc"]:
        first = next((e for e in errors if "JsonOutput" in e["loc"]), first)
    loc = list(first["loc"])
    # An error raised by our own graph check keeps its message and param.
    ctx_error = first.get("ctx", {}).get("error")
    if isinstance(ctx_error, SpecError):
        return SpecError(ctx_error.message, param=_join(prefix, ctx_error.param))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] != "missing" and isinstance(first.get("input"), str | int | float | bool):
        message += f" (got {first['input']!r})"
    if not loc:
        return SpecError(message, param=prefix or None)
    return SpecError(f"{_describe(loc, err)}: {message}", param=_join(prefix, _dotted(loc, err)))


def _join(prefix: str, param: str | None) -> str | None:
    if not prefix:
        return param
    return f"{prefix}.{param}" if param else prefix


def _component_name(err: ValidationError, index: int) -> str | None:
    data = getattr(err, "_cotune_input", None)
    if isinstance(data, dict):
        components = data.get("components")
        if isinstance(components, list) and index < len(components):
            entry = components[index]
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                return entry["name"]
    return None


def _dotted(loc: list[Any], err: ValidationError) -> str:
    parts: list[str] = []
    for i, part in enumerate(loc):
        if i > 0 and loc[i - 1] == "components" and isinstance(part, int):
            parts.append(_component_name(err, part) or str(part))
        elif isinstance(part, str) and part in {"literal['text']", "JsonOutput"}:
            continue
        else:
            parts.append(str(part))
    return ".".join(parts)


def _describe(loc: list[Any], err: ValidationError) -> str:
    if len(loc) >= 2 and loc[0] == "components" and isinstance(loc[1], int):
        name = _component_name(err, loc[1]) or f"#{loc[1] + 1}"
        rest = _dotted(loc[2:], err) or "(the component)"
        return f"component {name!r}: field {rest!r}"
    return f"field {_dotted(loc, err)!r}"


def parse_system(data: dict[str, Any], base_dir: Path | None = None) -> SystemSpec:
    refuse_loader_fields(data)
    try:
        system = SystemSpec.model_validate(data)
    except ValidationError as err:
        err._cotune_input = data  # type: ignore[attr-defined]
        raise spec_error_from(err) from None
    system.base_dir = base_dir
    return system


def load_system(path: str | Path) -> SystemSpec:
    path = Path(path)
    return parse_system(read_mapping(path), base_dir=path.resolve().parent)
