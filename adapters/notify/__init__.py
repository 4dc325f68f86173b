"""Notification adapters: ``log.LogNotifier``, ``otel.OtelNotifier``, a fan-out and a null one.

The log and OpenTelemetry adapters are imported from their modules; only the fan-out and
the null notifier, which need nothing beyond the core, are re-exported here.
"""

from ivcache.adapters.notify.fanout import MultiNotifier
from ivcache.adapters.notify.null import NullNotifier

__all__ = ["MultiNotifier", "NullNotifier"]
