"""Log lines as text or JSON, each carrying the request id of the call it belongs to."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# Set by the RPC wrapper for the duration of each call (crewdb/api/middleware.py).
request_id: ContextVar[str] = ContextVar("crewdb_request_id", default="-")
LOG_FORMATS = ("text", "json")
# Fields a call's log line carries besides the message (`extra=` of the access log).
_CALL_FIELDS = ("method", "code", "reason", "duration_ms", "user_id", "peer")
_TEXT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def stamp_request_ids() -> None:
    """Every record gets the current call's request id when it is made, whichever handler
    writes it."""
    make = logging.getLogRecordFactory()
    if getattr(make, "crewdb", False):
        return

    def stamped(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        record.request_id = request_id.get()
        return record

    stamped.crewdb = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(stamped)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """crewdb's own handler: writes to whatever sys.stderr is now (tests swap it), and is told
    apart from others so that configuring again replaces it."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class JsonLines(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, the call's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        for name in _CALL_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: int, fmt: str = "text") -> None:
    """Logs to standard error at `level`, as text lines or JSON lines, with request ids."""
    stamp_request_ids()
    handler = _Handler()
    handler.setFormatter(JsonLines() if fmt == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    # Replaces only a handler of ours from an earlier call (tests configure more than once and
    # keep their own capturing handlers).
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _Handler)] + [handler]
    root.setLevel(level)
    # Alembic narrates every step at INFO; crewdb.db.migrate logs what matters.
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))
