"""Structured logs: one JSON object per line, carrying the job id (and tenant, request id)
where there is one. Secrets are never passed to a logger: keys live in headers (never logged)
and hosted judges' keys in the server's environment (read only when the judge is called).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# ``extra=`` fields copied into the JSON line when present.
FIELDS = (
    "job_id",
    "file_id",
    "tenant",
    "request_id",
    "method",
    "path",
    "route",
    "status",
    "duration_ms",
    "code",
)
_HANDLER_MARK = "_cotune_json_handler"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    """A JSON (or plain) handler on the ``cotune`` logger, once per process. Records still
    propagate to the root logger (so test capture and hosting platforms see them)."""
    logger = logging.getLogger("cotune")
    logger.setLevel(level.upper())
    if any(getattr(h, _HANDLER_MARK, False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter())
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)
