"""The spec package's layout: the tool arg rules live once, each spec field says what it is,
each constant has one home and ``cotune/`` has no import circle."""

from __future__ import annotations

import ast
import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import cotune.spec as spec_package
from cotune.errors import SpecError, ToolError
from cotune.spec import MAX_K, Component, ToolArgError, check_tool_args, parse_system
from cotune.tiny import TINY_SYSTEM
from cotune.tools import ToolContext, run_tool

COTUNE = Path(__file__).resolve().parents[2] / "cotune"

# -- the tool arg rules: one checker, the same message from the spec and from the runtime -----


BAD_ARGS = [
    ("google", {"corpus": "c.jsonl"}, "tool", "unknown tool 'google'"),
    ("bm25", {"corpus": "c.jsonl", "code": "x"}, "args.code", "unknown to the bm25 tool"),
    ("bm25", {"k": 3}, "args.corpus", "required for the bm25 tool"),
    ("bm25", {"corpus": 3}, "args.corpus", "required for the bm25 tool"),
    ("http_search", {"url": "https://x", "k": 0}, "args.k", "got 0"),
    ("bm25", {"corpus": "c.jsonl", "k": True}, "args.k", "got True"),
    ("bm25", {"corpus": "c.jsonl", "k": MAX_K + 1}, "args.k", f"1..{MAX_K}"),
    ("python", {}, "args.function", "required for the python tool"),
]


@pytest.mark.parametrize(("tool", "args", "field", "said"), BAD_ARGS)
def test_the_spec_and_the_runtime_refuse_bad_args_with_the_one_rule(
    tool: str, args: dict[str, Any], field: str, said: str
) -> None:
    with pytest.raises(ToolArgError) as rule:
        check_tool_args(tool, args)
    assert rule.value.field == field and said in str(rule.value)
    expected = f"component 'search': {rule.value}"

    system = copy.deepcopy(TINY_SYSTEM)
    system["components"][1].update(tool=tool, args=args)
    with pytest.raises(SpecError) as parsed:
        parse_system(system)
    assert str(parsed.value) == expected
    assert parsed.value.param == f"components.search.{field}"

    component = Component(
        name="search", kind="tool", tool=tool, reads=["query"], writes="out", args=args
    )
    with pytest.raises(ToolError) as ran:
        run_tool(component, [{"query": "x"}], ToolContext())
    assert str(ran.value) == expected


@pytest.mark.parametrize(
    ("tool", "args"),
    [
        ("bm25", {"corpus": "c.jsonl"}),
        ("bm25", {"corpus": "file-abc", "k": MAX_K}),
        ("http_search", {"url": "https://x", "k": 1}),
        ("python", {"function": "anything: the registry is the spec's check"}),
    ],
)
def test_good_args_pass_the_rule(tool: str, args: dict[str, Any]) -> None:
    assert check_tool_args(tool, args) is None


def _definitions() -> dict[str, set[str]]:
    """Module-level assignments of the shared constants, by name: the files defining them."""
    names = {"TOOL_ARGS", "TOOL_KINDS", "MAX_K", "DEFAULT_K", "FILE_ID", "SPLITS"}
    names |= {"TERMINAL", "TRANSITIONS", "GPU_QUEUE", "CPU_QUEUE", "ADVANCE_JOB", "ROUTES"}
    found: dict[str, set[str]] = {name: set() for name in names}
    packages = [COTUNE.parent / p for p in ("cotune", "services", "workers")]
    for path in (p for package in packages for p in package.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            targets = (
                node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            )
            for target in targets:
                if isinstance(target, ast.Name) and target.id in names:
                    found[target.id].add(path.relative_to(COTUNE.parent).as_posix())
    return found


def test_each_constant_has_one_home() -> None:
    found = _definitions()
    for name in ("TOOL_ARGS", "TOOL_KINDS", "MAX_K", "DEFAULT_K"):
        assert found[name] == {"cotune/spec/tools.py"}, name
    for name in ("FILE_ID", "SPLITS"):
        assert found[name] == {"cotune/spec/refs.py"}, name
    for name in ("TERMINAL", "TRANSITIONS"):
        assert found[name] == {"cotune/store/status.py"}, name
    for name in ("GPU_QUEUE", "CPU_QUEUE", "ADVANCE_JOB", "ROUTES"):  # the API and the workers
        assert found[name] == {"cotune/jobs/queues.py"}, name


# -- each spec field says what it is ----------------------------------------------------------


def _spec_models() -> list[type[BaseModel]]:
    return [
        value
        for value in vars(spec_package).values()
        if isinstance(value, type) and issubclass(value, BaseModel)
    ]


def test_every_spec_field_has_a_description() -> None:
    models = _spec_models()
    assert {m.__name__ for m in models} >= {"SystemSpec", "Component", "JobSpec", "LoopConfig"}
    missing = [
        f"{model.__name__}.{name}"
        for model in models
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert missing == []


# -- no import circle -------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(COTUNE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph(*, module_level_only: bool) -> dict[str, set[str]]:
    """``cotune`` module -> the ``cotune`` modules it imports, including imports under
    ``TYPE_CHECKING`` and, unless ``module_level_only``, those inside functions. An import
    names the module it imports from (``from cotune.tools.registry import x`` is an edge to
    ``cotune.tools.registry``, not to the package Python runs first). Edges between a package
    and its own submodules are left out: a package that lazily loads its parts is no circle."""
    modules = {_module_name(p): p for p in COTUNE.rglob("*.py")}

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def related(a: str, b: str) -> bool:
        return a.startswith(b + ".") or b.startswith(a + ".")

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = ast.walk(tree) if not module_level_only else _module_level(tree.body)
        for node in nodes:
            named: list[str] = []
            if isinstance(node, ast.Import):
                named = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                named = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in named:
                target = known(name) if name.startswith("cotune") else None
                if target and target != module and not related(module, target):
                    graph[module].add(target)
    return graph


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements run on import: the body, and the bodies of its ``if``/``try`` blocks."""
    out: list[ast.stmt] = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If | ast.Try):
            for block in ("body", "orelse", "finalbody"):
                out += _module_level(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                out += _module_level(handler.body)
    return out


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_import_circle_among_module_level_imports() -> None:
    graph = _import_graph(module_level_only=True)
    assert "cotune.spec.system" in graph["cotune.spec.job"]  # the graph is no empty one
    assert "cotune.spec.tools" in graph["cotune.tools"]
    assert _circles(graph) == []


def test_no_import_circle_through_the_spec_even_counting_lazy_imports() -> None:
    """The circle ``data -> spec -> tools -> bm25 -> data`` was made of lazy imports: the spec
    took its arg rules from the package that runs tools."""
    graph = _import_graph(module_level_only=False)
    spec_modules = {m for m in graph if m == "cotune.spec" or m.startswith("cotune.spec.")}
    assert {"cotune.spec.system", "cotune.spec.tools", "cotune.spec.refs"} <= spec_modules
    # The spec reads the python tool registry (a leaf), nothing else of cotune.tools.
    tools_used = {t for m in spec_modules for t in graph[m] if t.startswith("cotune.tools")}
    assert tools_used == {"cotune.tools.registry"}
    assert graph["cotune.tools.registry"] <= {"cotune.errors"}
    # No circle anywhere in cotune/, lazy imports counted (the last one, models -> tiny ->
    # runtime -> models, went when prompt rendering got its own module, cotune/prompts.py).
    assert _circles(graph) == []


@pytest.mark.parametrize(
    "module",
    ["cotune.data", "cotune.spec", "cotune.spec.refs", "cotune.tools", "cotune.tools.bm25"],
)
def test_each_module_of_the_old_circle_imports_first_in_a_fresh_process(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}; import cotune.spec; cotune.spec.parse_system"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(COTUNE.parent), *sys.path])},
    )
    assert done.returncode == 0, done.stderr
