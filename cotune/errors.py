"""Errors the core raises. Each names what was wrong so a user can fix it."""

from __future__ import annotations


class CotuneError(Exception):
    """Base class for every error cotune raises on purpose."""


class SpecError(CotuneError, ValueError):
    """A system or job spec is invalid.

    ``param`` is a dotted path to the offending field (``components.answer.reads``), so the API
    can return it as the error's ``param``.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class DataError(CotuneError, ValueError):
    """A data or corpus file is invalid; names the file, the line and the field."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f", line {line}"
            where += ": "
        super().__init__(where + message)
        self.message = message
        self.path = path
        self.line = line
        self.field = field

    @property
    def param(self) -> str:
        """Where in the file, as an API error's ``param``: ``line 2.expected``, ``line 2`` (the
        line as a whole: not JSON, not UTF-8), ``expected`` (no single line) or ``file``."""
        if self.line is not None:
            return f"line {self.line}.{self.field}" if self.field else f"line {self.line}"
        return self.field or "file"


class EngineError(CotuneError, RuntimeError):
    """An inference engine failed in a way the caller should see."""


class ToolError(CotuneError, RuntimeError):
    """A tool failed, or a tool call was refused (e.g. a host not on the allow-list)."""
