"""Logging set-up: plain lines for people, or one JSON object per line for machines.

Records may carry ``job_id`` and ``user_id`` (``log.info(..., extra={"job_id": ...})``);
the JSON form puts them in fields of their own so a log store can filter by them.
Secrets never reach a line: :class:`RedactSecrets` rewrites token query parameters and
``Authorization`` values in every record, uvicorn's own included (its websocket
"[accepted]" line carries the query string, where browsers must put the token).
"""

from __future__ import annotations

import json
import logging
import re
import time

FIELDS = ("job_id", "user_id", "service", "worker_id")

_SECRET_QUERY = re.compile(r"(?i)([?&;](?:token|access_token|api_key|apikey|key)=)[^&;\s\"']+")
_SECRET_HEADER = re.compile(
    r"(?i)(\b(?:authorization|x-api-key)\b[\"']?\s*[:=,]\s*[\"']?(?:(?:bearer|basic|token)\s+)?)"
    r"[^\s\"',)]+"
)
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """``text`` with token query parameters and authorization values replaced."""
    text = _SECRET_QUERY.sub(lambda m: m.group(1) + REDACTED, text)
    return _SECRET_HEADER.sub(lambda m: m.group(1) + REDACTED, text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def protect_server_loggers() -> None:
    """Redact at the source: uvicorn's loggers, whatever handlers a deployment gives them."""
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())


_CONNECTION_LINES = ("connection open", "connection closed")


class DropConnectionLines(logging.Filter):
    """The websockets library's two info lines around every connection, which say nothing
    the ``"WebSocket /path" [accepted]`` line does not: easel's log is one line per job
    state change, not three per client watching one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and record.msg in _CONNECTION_LINES)


def quiet_connection_lines() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, DropConnectionLines) for f in logger.filters):
        logger.addFilter(DropConnectionLines())


class LineFormatter(logging.Formatter):
    """One line per record, tracebacks included, so log collectors never split a record."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\\n")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            if (value := getattr(record, name, None)) is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(log_format: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(LineFormatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
