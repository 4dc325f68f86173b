"""One notifier that publishes to several (log lines and OpenTelemetry, say)."""

from __future__ import annotations

from ivcache.core.events import Event
from ivcache.core.ports import Notifier

__all__ = ["MultiNotifier"]


class MultiNotifier:
    """Publishes each event to every notifier, in order.

    A notifier that raises does not stop the others from getting the event; the first
    exception is raised again once all have been called, so a broken notifier is not
    silenced here (what to do about it is the caller's decision).
    """

    def __init__(self, *notifiers: Notifier) -> None:
        self.notifiers: tuple[Notifier, ...] = notifiers

    def publish(self, event: Event) -> None:
        first: Exception | None = None
        for notifier in self.notifiers:
            try:
                notifier.publish(event)
            except Exception as e:
                if first is None:
                    first = e
        if first is not None:
            raise first

    def close(self) -> None:
        """Close the notifiers that hold events to send (the bus notifier's queue)."""
        for notifier in self.notifiers:
            close = getattr(notifier, "close", None)
            if callable(close):
                close()
