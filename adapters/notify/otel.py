"""OpenTelemetry: spans around requests, a span event per cache action, counters.

Only the OpenTelemetry *API* is used; the application (or a test) chooses the SDK and
exporters and passes its providers, or lets the API's globals decide.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Callable, Iterable, Iterator

from opentelemetry import metrics, trace
from opentelemetry.util.types import Attributes

from ivcache.core.events import CacheEvict, CacheHit, CacheMiss, Event, ImageDownloaded
from ivcache.core.model import ScopeTotals, Volume
from ivcache.core.ports import Span, StorageBackend

__all__ = ["DURATION_BUCKETS", "MeteredStorage", "OtelNotifier"]

#: seconds: OTel's advised HTTP duration buckets, stretched to the minutes an image
#: download can take
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

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

    Instruments (all with attribute ``host``), named and with units as OTel's conventions
    say (dotted lowercase names, UCUM units, no unit in the name):

    - counters ``ivcache.cache.requests`` (``{request}``, by ``outcome``: ``hit``, ``miss``,
      ``miss-uncached``; a request with the cache disabled announces nothing and is not
      counted), ``ivcache.cache.hits``, ``ivcache.cache.misses`` (also ``outcome``),
      ``ivcache.cache.evictions`` (``{entry}``, by ``reason``), ``ivcache.downloads`` and
      ``ivcache.bytes_downloaded`` (``By``);
    - histograms ``ivcache.download.duration`` and ``ivcache.clone.duration`` (``s``; the
      clone's through ``MeteredStorage``);
    - observable gauges ``ivcache.cache.entries`` (``{entry}``) and ``ivcache.cache.size``
      (``GiBy``) per host, read from ``totals`` (a callable giving each host's totals) when
      the metrics are collected.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None,
                 meter_provider: metrics.MeterProvider | None = None, *,
                 totals: Callable[[], Iterable[ScopeTotals]] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        meter = metrics.get_meter(__name__, meter_provider=meter_provider)
        counters = {name: meter.create_counter(name, unit=unit, description=text)
                    for name, unit, text in _COUNTERS}
        self._hits = counters["ivcache.cache.hits"]
        self._misses = counters["ivcache.cache.misses"]
        self._evictions = counters["ivcache.cache.evictions"]
        self._downloads = counters["ivcache.downloads"]
        self._bytes = counters["ivcache.bytes_downloaded"]
        self._requests = meter.create_counter(
            "ivcache.cache.requests", unit="{request}",
            description="Volume-from-image requests through the cache, by outcome")
        self._download_seconds = meter.create_histogram(
            "ivcache.download.duration", unit="s",
            description="Time to stream an image from the image source into a volume",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self._clone_seconds = meter.create_histogram(
            "ivcache.clone.duration", unit="s",
            description="Time to clone a volume (a cached one, for a hit or a fill)",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.totals = totals
        meter.create_observable_gauge(
            "ivcache.cache.entries", [self._observe_entries], unit="{entry}",
            description="Cache entries on a host (CREATING ones included)")
        meter.create_observable_gauge(
            "ivcache.cache.size", [self._observe_size], unit="GiBy",
            description="GiB of cache volumes on a host")
        self._on_close = on_close

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
            self._requests.add(1, {**host, "outcome": "hit"})
        elif isinstance(event, CacheMiss):
            self._misses.add(1, {**host, "outcome": event.outcome})
            self._requests.add(1, {**host, "outcome": event.outcome})
        elif isinstance(event, CacheEvict):
            self._evictions.add(1, {**host, "reason": event.reason.value})
        elif isinstance(event, ImageDownloaded):
            self._downloads.add(1, host)
            self._bytes.add(event.bytes, host)
            self._download_seconds.record(event.seconds, host)

    def record_clone(self, host: str, seconds: float) -> None:
        self._clone_seconds.record(seconds, {"host": host})

    def close(self) -> None:
        """Flush and shut down what the SDK set up for this notifier (if it did)."""
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()

    def _observe(self, value: Callable[[ScopeTotals], int]) -> list[metrics.Observation]:
        if self.totals is None:
            return []
        return [metrics.Observation(value(t), {"scope": t.scope}) for t in self.totals()]

    def _observe_entries(self, _options: metrics.CallbackOptions
                         ) -> list[metrics.Observation]:
        return self._observe(lambda t: t.count)

    def _observe_size(self, _options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return self._observe(lambda t: t.size_gb)


class MeteredStorage:
    """A storage backend whose clones are timed into ``ivcache.clone.duration``; every
    other call goes straight through."""

    def __init__(self, inner: StorageBackend, notifier: OtelNotifier, host: str) -> None:
        self.inner, self.notifier, self.host = inner, notifier, host

    def clone_volume(self, src_id: str, dst_id: str, size_gb: int, owner: str) -> Volume:
        started = time.perf_counter()
        volume = self.inner.clone_volume(src_id, dst_id, size_gb, owner)
        self.notifier.record_clone(self.host, time.perf_counter() - started)
        return volume

    def create_volume(self, volume_id: str, size_gb: int, owner: str) -> Volume:
        return self.inner.create_volume(volume_id, size_gb, owner)

    def write_image(self, volume_id: str, chunks: Iterable[bytes]) -> int:
        return self.inner.write_image(volume_id, chunks)

    def extend_volume(self, volume_id: str, size_gb: int) -> Volume:
        return self.inner.extend_volume(volume_id, size_gb)

    def delete_volume(self, volume_id: str) -> None:
        self.inner.delete_volume(volume_id)

    def get_volume(self, volume_id: str) -> Volume:
        return self.inner.get_volume(volume_id)

    def list_volumes(self, owner: str | None = None) -> list[Volume]:
        return self.inner.list_volumes(owner)

    def can_fill_from(self, source: StorageBackend) -> bool:
        return self.inner.can_fill_from(_unwrapped(source))

    def fill_from(self, source: StorageBackend, src_id: str, dst_id: str, size_gb: int,
                  owner: str) -> Volume:
        return self.inner.fill_from(_unwrapped(source), src_id, dst_id, size_gb, owner)

    def leftovers(self, *, remove: bool) -> list[tuple[str, str, int]]:
        return self.inner.leftovers(remove=remove)

    def __getattr__(self, name: str) -> object:
        # A backend's own extras (FileStorage.last_clone_method, ...) stay reachable.
        return getattr(self.inner, name)


def _unwrapped(storage: StorageBackend) -> StorageBackend:
    return storage.inner if isinstance(storage, MeteredStorage) else storage


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
