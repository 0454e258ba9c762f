"""Server-side registry of python tools.

A ``python`` tool component names a function registered here (``args: {function: NAME}``).
Nothing from a spec is ever executed as code: the name is only looked up in this registry.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from cotune.errors import ToolError

PythonTool = Callable[..., Any]

_TOOLS: dict[str, PythonTool] = {}


def register_tool(name: str) -> Callable[[PythonTool], PythonTool]:
    """Decorator: register a python tool under ``name``. A taken name is refused."""

    def add(fn: PythonTool) -> PythonTool:
        existing = _TOOLS.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"python tool {name!r} is already registered")
        _TOOLS[name] = fn
        return fn

    return add


def known_python_tools() -> set[str]:
    return set(_TOOLS)


def get_python_tool(name: str) -> PythonTool:
    try:
        return _TOOLS[name]
    except KeyError:
        raise ToolError(
            f"python tool {name!r} is not registered; registered: {sorted(_TOOLS)}"
        ) from None


def _items(value: Any) -> list[str]:
    """A list's items, or a text's lines, without the blank ones."""
    items = value if isinstance(value, list) else str(value).splitlines()
    return [str(item) for item in items if str(item).strip()]


@register_tool("count_lines")
def count_lines(value: Any) -> str:
    """How many non-empty lines the text has (or non-empty items the list has)."""
    return str(len(_items(value)))


@register_tool("word_count")
def word_count(value: Any) -> str:
    """How many whitespace-separated words the text (or all the list's items) holds."""
    return str(sum(len(item.split()) for item in _items(value)))


# the number words a count is written in ("two flutes"): count_items, and the paraphrase rule
_NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
)
NUMBER_WORDS: dict[str, int] = {word: value for value, word in enumerate(_NUMBERS.split())}
_NUMBER_WORDS = NUMBER_WORDS | {"a": 1, "an": 1}
_LIST_MARK = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
_QUANTITY = re.compile(r"^(\d+|[a-z]+)\b")


@register_tool("count_items")
def count_items(value: Any) -> str:
    """How many things a list names. Items are lines (or list items), a line holding commas is
    split at them; an item counts as the quantity it starts with ("3 apples", "two heads of
    broccoli", "a plum": 3, 2, 1) and as 1 without one. List marks ("- ", "1. ") and heading
    lines ending in ":" are ignored."""
    total = 0
    for line in _items(value):
        if line.rstrip().endswith(":"):
            continue  # a heading ("Fruits:"), not an item
        for part in re.split(r"[,;]", _LIST_MARK.sub("", line)):
            item = re.sub(r"^\s*and\s+", "", part.strip().lower()).strip(" .")
            if not item:
                continue
            match = _QUANTITY.match(item)
            word = match.group(1) if match else ""
            total += int(word) if word.isdigit() else _NUMBER_WORDS.get(word, 1)
    return str(total)
