"""The probe's own logs: text or JSON lines on stderr, one line per problem,
rate-limited so that a problem repeated per event cannot flood the journal."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

LOGGER_NAME = "probe"


class RateLimitFilter(logging.Filter):
    """Lets one record per message template through per ``interval`` seconds;
    the next one that passes says how many were held back."""

    def __init__(self, interval: float = 60.0, clock=time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._suppressed.pop(key, 0)
        if held:
            record.suppressed = held
        return True


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"probe: {record.levelname.lower()}: {record.getMessage()}"
        held = getattr(record, "suppressed", 0)
        if held:
            line += f" ({held} similar suppressed)"
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        held = getattr(record, "suppressed", 0)
        if held:
            entry["suppressed"] = held
        return json.dumps(entry)


def configure(log_format: str = "text", stream: TextIO | None = None) -> logging.Logger:
    """Set up the ``probe`` logger; returns it."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    handler.addFilter(RateLimitFilter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger
