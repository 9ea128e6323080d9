"""Logging: JSON or LTSV records, to files or to stdout/stderr.

Two streams, as the platform contract has them: the access log (one record
per request, logger ``proxy.access``) and everything else (Gunicorn's own
messages and the proxy's errors, loggers ``gunicorn.error`` and ``proxy``).
File handlers are plain ``FileHandler``s so that Gunicorn's SIGUSR1 handling
(``reopen_files``) reopens them in the master and in every worker.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from .settings import Settings

access_log = logging.getLogger("proxy.access")
error_log = logging.getLogger("proxy")


def iso_time(epoch: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2026-11-21T05:10:34.123Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


class _Timestamped:
    """Puts ``time`` (ISO 8601 UTC, ms), ``level`` and ``logger`` on diagnostics."""

    def base_fields(self, record: logging.LogRecord) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            fields["request_id"] = request_id
        if record.exc_info:
            fields["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        return fields


class JsonErrorFormatter(_Timestamped, JsonFormatter):
    """Diagnostics as one JSON object a line; tracebacks stay inside the record."""

    def format(self, record: logging.LogRecord) -> str:
        return self.jsonify_log_record(self.base_fields(record))


class JsonAccessFormatter(JsonFormatter):
    """The access record (a dict passed as the message) as one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        return self.jsonify_log_record(record.msg)


_LTSV_ESCAPES = {i: f"\\x{i:02x}" for i in range(32)}
_LTSV_ESCAPES.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r", ord("\\"): "\\\\", 127: "\\x7f"})


def ltsv(fields: dict[str, Any]) -> str:
    """Labelled tab-separated values; control characters are escaped so a
    value can neither end the line nor start a forged field."""
    parts = []
    for key, value in fields.items():
        if value is None:
            value = "-"
        elif isinstance(value, float):
            value = f"{value:.6f}"
        parts.append(f"{key}:{str(value).translate(_LTSV_ESCAPES)}")
    return "\t".join(parts)


class LtsvErrorFormatter(_Timestamped, logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return ltsv(self.base_fields(record))


class LtsvAccessFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return ltsv(record.msg)  # type: ignore[arg-type]


def logging_config(settings: Settings) -> dict[str, Any]:
    """The ``logconfig_dict`` Gunicorn applies in the master and each worker."""
    kind = "Json" if settings.log_format == "json" else "Ltsv"
    if settings.log_target == "file":
        access_handler = {"class": "logging.FileHandler", "filename": str(settings.access_log)}
        error_handler = {"class": "logging.FileHandler", "filename": str(settings.error_log)}
    else:
        access_handler = {"class": "logging.StreamHandler", "stream": "ext://sys.stdout"}
        error_handler = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}
    access_handler["formatter"] = "access"
    error_handler["formatter"] = "error"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "access": {"()": f"proxy.logs.{kind}AccessFormatter"},
            "error": {"()": f"proxy.logs.{kind}ErrorFormatter"},
        },
        "handlers": {
            "access": access_handler,
            "error": error_handler,
        },
        "root": {"level": "WARNING", "handlers": ["error"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["error"], "propagate": False},
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
            "proxy": {"level": "INFO", "handlers": ["error"], "propagate": False},
            "proxy.access": {
                "level": "INFO" if settings.access_log_enabled else "CRITICAL",
                "handlers": ["access"],
                "propagate": False,
            },
        },
    }
