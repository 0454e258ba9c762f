"""No code path loads a pickle, runs a model's own code or evaluates text (issue 11's rule).

An AST walk over every Python file of the project, not a text grep: a comment or docstring
that mentions ``pickle`` is fine, a call is not. Refused anywhere:

- ``trust_remote_code=`` with anything but the constant ``False``;
- ``pickle``/``cloudpickle``/``dill``/``joblib`` loads, ``numpy.load(allow_pickle=True)``,
  ``torch.load`` without ``weights_only=True``, ``yaml.load``/``yaml.unsafe_load``;
- the builtins ``eval``, ``exec`` and ``compile`` (``model.eval()`` is a method, not these).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("cotune", "services", "workers", "benchmarks", "scripts", "examples")
UNPICKLERS = {"pickle", "cloudpickle", "dill", "joblib", "_pickle"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_constant(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def problems(source: str, where: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, last = name.rpartition(".")
        remote = _keyword(node, "trust_remote_code")
        if remote is not None and not _is_constant(remote, False):
            found.append(f"{where}:{node.lineno}: trust_remote_code is not False")
        if head.split(".")[-1] in UNPICKLERS and last in ("load", "loads", "Unpickler"):
            found.append(f"{where}:{node.lineno}: {name} unpickles")
        if name in ("torch.load",) and not _is_constant(_keyword(node, "weights_only"), True):
            found.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
        pickles = _keyword(node, "allow_pickle")
        numpy_load = last == "load" and head in ("np", "numpy")
        if numpy_load and pickles is not None and not _is_constant(pickles, False):
            found.append(f"{where}:{node.lineno}: numpy.load with allow_pickle")
        if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            found.append(f"{where}:{node.lineno}: {name} (use yaml.safe_load)")
        if name in ("eval", "exec", "compile"):
            found.append(f"{where}:{node.lineno}: builtin {name}()")
    return found


def test_no_unpickling_remote_code_or_eval_in_the_project() -> None:
    files = [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    assert len(files) > 50  # the walk saw the project
    found = [
        problem
        for path in files
        for problem in problems(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    ]
    assert found == []


def test_the_walk_finds_each_kind_of_violation() -> None:
    planted = """
import pickle, torch, yaml, numpy as np
from transformers import AutoModel
AutoModel.from_pretrained("m", trust_remote_code=True)
AutoModel.from_pretrained("m", trust_remote_code=flag)
pickle.loads(b"")
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
yaml.load("a: 1")
np.load("x.npy", allow_pickle=True)
eval("1 + 1")
"""
    assert len(problems(planted, "planted")) == 8
    clean = """
import torch, yaml
AutoModel.from_pretrained("m", trust_remote_code=False)
torch.load("x.pt", weights_only=True)
yaml.safe_load("a: 1")
model.eval()
"""
    assert problems(clean, "clean") == []
