"""Notification adapters: ``log.LogNotifier``, ``otel.OtelNotifier``, and a fan-out.

The log and OpenTelemetry adapters are imported from their modules; only the fan-out,
which needs nothing beyond the core, is re-exported here.
"""

from ivcache.adapters.notify.fanout import MultiNotifier

__all__ = ["MultiNotifier"]
