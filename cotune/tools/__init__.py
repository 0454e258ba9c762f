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

if TYPE_CHECKING:
    from cotune.spec import Component, SystemSpec

TOOL_ARGS: dict[str, set[str]] = {
    "bm25": {"corpus", "k"},
    "http_search": {"url", "k"},
    "python": {"function"},
}
DEFAULT_K = 3
MAX_K = 100


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
    if component.kind != "tool" or component.tool not in TOOL_ARGS:
        raise ToolError(f"{where} is not a bm25, http_search or python tool component")
    tool, args = component.tool, component.args
    unknown = sorted(set(args) - TOOL_ARGS[tool])
    if unknown:
        raise ToolError(
            f"{where}: field 'args': {unknown} unknown to the {tool} tool "
            f"(it takes {sorted(TOOL_ARGS[tool])})"
        )
    for inputs in inputs_batch:
        missing = [f for f in component.reads if f not in inputs]
        if missing:
            raise ToolError(f"{where}: input is missing the field(s) {missing} it reads")

    if tool == "python":
        return _run_python(component, inputs_batch, where)

    queries = [_query_text(inputs[component.reads[0]]) for inputs in inputs_batch]
    k = args.get("k", DEFAULT_K)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ToolError(f"{where}: field 'args.k' must be an integer in 1..{MAX_K}, got {k!r}")
    if tool == "bm25":
        from cotune.tools.bm25 import get_index

        corpus = args.get("corpus")
        if not isinstance(corpus, str):
            raise ToolError(f"{where}: field 'args.corpus' is required for the bm25 tool")
        return list(get_index(ctx.corpus_path(corpus)).search_many(queries, k))

    from cotune.tools.http_search import search_http

    url = args.get("url")
    if not isinstance(url, str):
        raise ToolError(f"{where}: field 'args.url' is required for the http_search tool")
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

    name = component.args.get("function")
    if not isinstance(name, str):
        raise ToolError(f"{where}: field 'args.function' is required for the python tool")
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
