"""Log output for operators and for log shippers.

``vmm --log-format json`` writes one JSON object per line (Elasticsearch,
Loki, journald's JSON import read it without a parsing rule): the time in
ISO 8601 UTC, the level, the logger, the message, and the structured fields
the engine attaches to each phase and stage line (``migration_id``, ``host``,
``phase``, ``role``, ``stage``, ``outcome``, ``duration_ms``, ``reverted``),
so a shipper can filter one migration's lines without a regular expression.
The text format stays the default for people reading a terminal.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

#: Values of ``--log-format``.
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line, with the record's ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def configure(level: int, fmt: str = "text") -> None:
    """Set up the root logger: ``fmt`` 'text' or 'json' on stderr.

    Like ``logging.basicConfig`` (which it calls), it does nothing when the
    root logger already has a handler (an embedding program, pytest).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
