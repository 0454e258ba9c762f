"""The rules of a tool component's ``args``: which tools exist, what each takes, which args name
a file. The spec checks them when it is parsed and ``cotune.tools.run_tool`` before it runs a
component (a ``Component`` can be built, and its ``args`` changed, without a parse); both call
``check_tool_args``, so a rule and its message live here once.

This module imports nothing of ``cotune.tools``: the spec needs the rules, not the tools, which
is what keeps ``data -> spec -> tools -> bm25 -> data`` from being a circle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

Purpose = Literal["data", "fine-tune", "feedback", "corpus", "model"]

TOOL_ARGS: dict[str, frozenset[str]] = {
    "bm25": frozenset({"corpus", "k"}),
    "http_search": frozenset({"url", "k"}),
    "python": frozenset({"function"}),
}
TOOL_KINDS = tuple(TOOL_ARGS)
REQUIRED_ARG = {"bm25": "corpus", "http_search": "url", "python": "function"}
# Args whose value names a file, and the purpose that file is uploaded with (see spec/refs.py).
FILE_ARGS: dict[str, dict[str, Purpose]] = {"bm25": {"corpus": "corpus"}}
DEFAULT_K = 3
MAX_K = 100


class ToolArgError(ValueError):
    """A tool arg breaks a rule; ``field`` is where, relative to the component (``tool``,
    ``args.k``). The spec raises it as a ``SpecError``, the runtime as a ``ToolError``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field {field!r}{message}")
        self.field = field


def check_tool_args(tool: str | None, args: Mapping[str, Any]) -> None:
    """The tool is known, its args are the ones it takes, the required one is a string and
    ``k`` (when given) an integer in 1..MAX_K. Raises ``ToolArgError``."""
    if tool not in TOOL_ARGS:
        raise ToolArgError("tool", f": unknown tool {tool!r}; known: {list(TOOL_KINDS)}")
    unknown = sorted(set(args) - TOOL_ARGS[tool])
    if unknown:
        raise ToolArgError(
            f"args.{unknown[0]}",
            f" is unknown to the {tool} tool (it takes {sorted(TOOL_ARGS[tool])})",
        )
    required = REQUIRED_ARG[tool]
    if not isinstance(args.get(required), str):
        raise ToolArgError(f"args.{required}", f" is required for the {tool} tool (a string)")
    if "k" in args:
        k = args["k"]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ToolArgError("args.k", f" must be an integer in 1..{MAX_K}, got {k!r}")
