"""Events as log lines: one logfmt line per event, for grep and log shippers."""

from __future__ import annotations

import enum
import json
import logging

from ivcache.core.events import Event

__all__ = ["LogNotifier", "logfmt"]


class LogNotifier:
    """Logs each event at INFO on ``ivcache.events`` (or the logger given).

    The line reads ``event=image_volume_cache.hit image_id=... host=... entry_id=...``;
    the record also carries ``ivcache_event`` (the name) and ``ivcache_payload`` (a dict)
    for handlers that format records as JSON.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger if logger is not None else logging.getLogger("ivcache.events")

    def publish(self, event: Event) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        payload = event.payload()
        # "%s" keeps a '%' in an image name from being read as a format directive.
        self.logger.info("%s", logfmt({"event": event.name, **payload}),
                         extra={"ivcache_event": event.name, "ivcache_payload": payload})


def logfmt(fields: dict[str, object]) -> str:
    """``key=value`` pairs separated by spaces; values quoted when they need it.

    >>> logfmt({"event": "x", "name": "my image", "n": 3, "ok": True, "gone": None})
    'event=x name="my image" n=3 ok=true gone='
    """
    return " ".join(f"{key}={_value(value)}" for key, value in fields.items())


def _value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        value = value.value
    text = str(value)
    if text and not any(c.isspace() or c in '"=\\' or not c.isprintable() for c in text):
        return text
    # JSON string escaping turns newlines and quotes into escapes: the event stays on
    # one line whatever an image is called.
    return json.dumps(text, ensure_ascii=False)
