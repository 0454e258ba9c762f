"""Tool components: run a ``bm25``, ``http_search`` or registered ``python`` tool on a batch.

``run_tool(component, inputs_batch, ctx)`` takes one dict per example, mapping the component's
``reads`` to values, and returns one output per example. The first read field is the query of
``bm25`` and ``http_search``; a ``python`` tool gets the dict as keyword arguments (or, when it
reads one field and the function takes one parameter under another name, that value).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotune.errors import ToolError
from cotune.spec.tools import DEFAULT_K, ToolArgError, check_tool_args

if TYPE_CHECKING:
    from cotune.settings import Settings
    from cotune.spec.system import Component, SystemSpec


@dataclass
class ToolContext:
    """What tools may touch: where corpora live and which hosts may be called.

    ``resolve_corpus`` maps a spec's ``corpus`` value to a file (the API maps file ids); without
    it, relative paths resolve against ``base_dir`` (the spec file's folder).
    ``private_hosts`` are allowed hosts that may also resolve to internal addresses.
    """

    base_dir: Path | None = None
    allowed_hosts: set[str] = field(default_factory=set)
    private_hosts: set[str] = field(default_factory=set)
    resolve_corpus: Callable[[str], Path] | None = None
    http_timeout: float = 10.0

    @classmethod
    def for_system(cls, system: SystemSpec, **kwargs: Any) -> ToolContext:
        return cls(base_dir=system.base_dir, **kwargs)

    @classmethod
    def from_settings(cls, system: SystemSpec, settings: Settings, **kwargs: Any) -> ToolContext:
        """The system's tools under the deployment's http_search allow-list: what a job's
        runs (every runner) and the served system may reach."""
        return cls.for_system(
            system,
            allowed_hosts=set(settings.http_search_allowed_hosts),
            private_hosts=set(settings.http_search_private_hosts),
            **kwargs,
        )

    def corpus_path(self, corpus: str) -> Path:
        if self.resolve_corpus is not None:
            return self.resolve_corpus(corpus)
        path = Path(corpus)
        if path.is_absolute() or self.base_dir is None:
            return path
        return self.base_dir / path


def run_tool(
    component: Component, inputs_batch: list[dict[str, Any]], ctx: ToolContext
) -> list[Any]:
    where = f"component {component.name!r}"
    if component.kind != "tool":
        raise ToolError(f"{where} is not a tool component")
    # Checked again although a parsed spec passed it: a Component is built (and its args
    # changed) without a parse, and a bad k or corpus would fail obscurely below.
    try:
        check_tool_args(component.tool, component.args)
    except ToolArgError as err:
        raise ToolError(f"{where}: {err}") from None
    tool, args = component.tool, component.args
    for inputs in inputs_batch:
        missing = [f for f in component.reads if f not in inputs]
        if missing:
            raise ToolError(f"{where}: input is missing the field(s) {missing} it reads")

    if tool == "python":
        return _run_python(component, inputs_batch, where)

    queries = [_query_text(inputs[component.reads[0]]) for inputs in inputs_batch]
    k = args.get("k", DEFAULT_K)
    if tool == "bm25":
        from cotune.tools.bm25 import get_index

        return list(get_index(ctx.corpus_path(args["corpus"])).search_many(queries, k))

    from cotune.tools.http_search import search_http

    url = args["url"]
    try:
        return [
            search_http(url, q, k, ctx.allowed_hosts, ctx.private_hosts, ctx.http_timeout)
            for q in queries
        ]
    except ToolError as err:
        raise ToolError(f"{where}: {err}") from err


def _query_text(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return "" if value is None else str(value)


def _run_python(component: Component, inputs_batch: list[dict[str, Any]], where: str) -> list[Any]:
    from cotune.tools.registry import get_python_tool

    name = component.args["function"]  # a string: run_tool checked the args
    try:
        fn = get_python_tool(name)
    except ToolError as err:
        raise ToolError(f"{where}: field 'args.function': {err}") from None
    signature = inspect.signature(fn)
    outputs = []
    for inputs in inputs_batch:
        values = {f: inputs[f] for f in component.reads}
        bound = _bind(signature, values)
        if bound is None:
            raise ToolError(
                f"{where}: python tool {name!r}{signature} cannot take the fields "
                f"it reads {component.reads} as arguments"
            )
        try:
            outputs.append(fn(*bound.args, **bound.kwargs))
        except Exception as err:
            raise ToolError(
                f"{where}: python tool {name!r} failed: {type(err).__name__}: {err}"
            ) from err
    return outputs


def _bind(signature: inspect.Signature, values: dict[str, Any]) -> inspect.BoundArguments | None:
    """Bind by field name; failing that, a single field to a single parameter."""
    try:
        return signature.bind(**values)
    except TypeError:
        pass
    if len(values) == 1:
        try:
            return signature.bind(*values.values())
        except TypeError:
            pass
    return None


__all__ = ["ToolContext", "run_tool"]
