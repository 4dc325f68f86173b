"""A notifier that drops every event: for ``notifier = none``."""

from __future__ import annotations

from ivcache.core.events import Event

__all__ = ["NullNotifier"]


class NullNotifier:
    """Publishes nowhere and keeps nothing, so a long-running process does not grow."""

    def publish(self, event: Event) -> None:
        pass
