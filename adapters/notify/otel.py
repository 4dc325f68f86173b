"""OpenTelemetry: spans around requests, a span event per cache action, counters.

Only the OpenTelemetry *API* is used; the application (or a test) chooses the SDK and
exporters and passes its providers, or lets the API's globals decide.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator

from opentelemetry import metrics, trace
from opentelemetry.util.types import Attributes

from ivcache.core.events import CacheEvict, CacheHit, CacheMiss, Event, ImageDownloaded
from ivcache.core.ports import Span

__all__ = ["OtelNotifier"]

_Scalar = str | int | float | bool


_COUNTERS = (
    ("ivcache.cache.hits", "{hit}", "Requests served by cloning a cached volume"),
    ("ivcache.cache.misses", "{miss}", "Requests that found no usable cache entry"),
    ("ivcache.cache.evictions", "{entry}", "Cache entries evicted, by reason"),
    ("ivcache.downloads", "{download}", "Images downloaded from the image source"),
    ("ivcache.bytes_downloaded", "By", "Bytes downloaded from the image source"),
)


class OtelNotifier:
    """Implements both the ``Notifier`` and the ``Tracer`` port.

    Counters (all with attribute ``host``):

    - ``ivcache.cache.hits``, ``ivcache.cache.misses`` (also ``outcome``: ``miss`` or
      ``miss-uncached``), ``ivcache.cache.evictions`` (also ``reason``);
    - ``ivcache.downloads`` and ``ivcache.bytes_downloaded`` for each image download.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None,
                 meter_provider: metrics.MeterProvider | None = None) -> None:
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        meter = metrics.get_meter(__name__, meter_provider=meter_provider)
        counters = {name: meter.create_counter(name, unit=unit, description=text)
                    for name, unit, text in _COUNTERS}
        self._hits = counters["ivcache.cache.hits"]
        self._misses = counters["ivcache.cache.misses"]
        self._evictions = counters["ivcache.cache.evictions"]
        self._downloads = counters["ivcache.downloads"]
        self._bytes = counters["ivcache.bytes_downloaded"]

    @contextlib.contextmanager
    def span(self, name: str, attributes: dict[str, _Scalar]) -> Iterator[Span]:
        """A span, current for the block; an exception leaving it is recorded on it."""
        with self._tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    def publish(self, event: Event) -> None:
        """Record ``event`` on the current span (if any) and count it."""
        attributes = _attributes(event.payload())
        # With no span current this is the API's non-recording span: a no-op, while
        # the counters below still count.
        trace.get_current_span().add_event(event.name, attributes=attributes)
        host = {"host": event.host}
        if isinstance(event, CacheHit):
            self._hits.add(1, host)
        elif isinstance(event, CacheMiss):
            self._misses.add(1, {**host, "outcome": event.outcome})
        elif isinstance(event, CacheEvict):
            self._evictions.add(1, {**host, "reason": event.reason.value})
        elif isinstance(event, ImageDownloaded):
            self._downloads.add(1, host)
            self._bytes.add(event.bytes, host)


def _attributes(payload: dict[str, object]) -> Attributes:
    """OTel attribute values are str, int, float or bool: convert the rest, drop None
    (the SDK would drop it with a warning)."""
    out: dict[str, _Scalar] = {}
    for key, value in payload.items():
        if value is None:
            continue
        if isinstance(value, enum.Enum):
            value = value.value
        out[key] = value if isinstance(value, str | int | float | bool) else str(value)
    return out
