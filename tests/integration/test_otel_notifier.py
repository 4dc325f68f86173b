"""OtelNotifier against the OpenTelemetry SDK's in-memory exporter and metric reader.

Providers are passed in, never installed as globals, so tests do not leak into each other.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ivcache.adapters.notify.otel import OtelNotifier
from ivcache.core.events import (
    CacheEntryCreated,
    CacheEvict,
    CacheHit,
    CacheMiss,
    EvictReason,
    ImageDownloaded,
)
from ivcache.core.ports import Notifier, Tracer

Points = dict[frozenset[tuple[str, object]], int | float]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def notifier(spans: InMemorySpanExporter, reader: InMemoryMetricReader) -> OtelNotifier:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    return OtelNotifier(tracer_provider, MeterProvider(metric_readers=[reader]))


def counter(reader: InMemoryMetricReader, name: str) -> Points:
    """The counter's value for each set of attributes, as collected now."""
    found: Points = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        assert isinstance(point, NumberDataPoint)
                        found[frozenset((point.attributes or {}).items())] = point.value
    return found


def key(**attributes: object) -> frozenset[tuple[str, object]]:
    return frozenset(attributes.items())


def test_the_notifier_fits_both_the_notifier_and_tracer_ports(
        notifier: OtelNotifier, spans: InMemorySpanExporter) -> None:
    as_notifier: Notifier = notifier
    as_tracer: Tracer = notifier

    with as_tracer.span("ivcache.request", {}):
        as_notifier.publish(CacheHit("img-1", "node-1"))

    [finished] = spans.get_finished_spans()
    assert [e.name for e in finished.events] == ["image_volume_cache.hit"]


def test_a_span_is_recorded_with_its_attributes_and_those_set_inside(
        notifier: OtelNotifier, spans: InMemorySpanExporter) -> None:
    with notifier.span("ivcache.create_volume", {"image_id": "img-1", "size_gb": 10}) as span:
        span.set_attribute("outcome", "hit")

    [finished] = spans.get_finished_spans()
    assert finished.name == "ivcache.create_volume"
    assert dict(finished.attributes or {}) == {
        "image_id": "img-1", "size_gb": 10, "outcome": "hit"}


def test_events_are_added_to_the_current_span_with_their_payload(
        notifier: OtelNotifier, spans: InMemorySpanExporter) -> None:
    with notifier.span("ivcache.create_volume", {"image_id": "img-1"}):
        notifier.publish(CacheEvict("img-1", "node-1", reason=EvictReason.STALE,
                                    entry_id="e-1", size_gb=2))
        notifier.publish(CacheMiss("img-1", "node-1"))
        notifier.publish(ImageDownloaded("img-1", "node-1", bytes=4096, seconds=0.25))

    [finished] = spans.get_finished_spans()
    assert [(e.name, dict(e.attributes or {})) for e in finished.events] == [
        ("image_volume_cache.evict", {"image_id": "img-1", "host": "node-1",
                                      "reason": "stale", "entry_id": "e-1", "size_gb": 2}),
        ("image_volume_cache.miss", {"image_id": "img-1", "host": "node-1",
                                     "outcome": "miss", "filled_from": "image-source"}),
        ("image_volume_cache.download", {"image_id": "img-1", "host": "node-1",
                                         "bytes": 4096, "seconds": 0.25}),
    ]


def test_hits_misses_and_evictions_are_counted_by_host_outcome_and_reason(
        notifier: OtelNotifier, reader: InMemoryMetricReader) -> None:
    for event in [
        CacheHit("img-1", "node-1"), CacheHit("img-1", "node-1"), CacheHit("img-2", "node-2"),
        CacheMiss("img-3", "node-1"), CacheMiss("img-4", "node-1", outcome="miss-uncached"),
        CacheEvict("img-5", "node-1", reason=EvictReason.LRU),
        CacheEvict("img-6", "node-1", reason=EvictReason.LRU),
        CacheEvict("img-7", "node-2", reason=EvictReason.IMAGE_DELETED),
        CacheEntryCreated("img-3", "node-1"),
    ]:
        notifier.publish(event)

    assert counter(reader, "ivcache.cache.hits") == {key(host="node-1"): 2,
                                                     key(host="node-2"): 1}
    assert counter(reader, "ivcache.cache.misses") == {
        key(host="node-1", outcome="miss"): 1, key(host="node-1", outcome="miss-uncached"): 1}
    assert counter(reader, "ivcache.cache.evictions") == {
        key(host="node-1", reason="lru"): 2, key(host="node-2", reason="image-deleted"): 1}


def test_downloads_count_once_each_and_add_up_their_bytes(
        notifier: OtelNotifier, reader: InMemoryMetricReader) -> None:
    notifier.publish(ImageDownloaded("img-1", "node-1", bytes=1000, seconds=1.0))
    notifier.publish(ImageDownloaded("img-2", "node-1", bytes=500, seconds=0.5))

    assert counter(reader, "ivcache.downloads") == {key(host="node-1"): 2}
    assert counter(reader, "ivcache.bytes_downloaded") == {key(host="node-1"): 1500}


def test_an_event_outside_any_span_is_still_counted(
        notifier: OtelNotifier, spans: InMemorySpanExporter,
        reader: InMemoryMetricReader) -> None:
    notifier.publish(CacheHit("img-1", "node-1"))

    assert spans.get_finished_spans() == ()
    assert counter(reader, "ivcache.cache.hits") == {key(host="node-1"): 1}


def test_an_exception_leaving_a_span_marks_it_as_an_error(
        notifier: OtelNotifier, spans: InMemorySpanExporter) -> None:
    with pytest.raises(ValueError), notifier.span("ivcache.create_volume", {}):
        raise ValueError("boom")

    [finished] = spans.get_finished_spans()
    assert finished.status.status_code is trace.StatusCode.ERROR
    assert [e.name for e in finished.events] == ["exception"]


def test_without_providers_the_api_defaults_are_used_and_nothing_fails() -> None:
    notifier = OtelNotifier()

    with notifier.span("ivcache.create_volume", {"image_id": "img-1"}) as span:
        span.set_attribute("outcome", "hit")
        notifier.publish(CacheHit("img-1", "node-1"))


def test_the_service_makes_one_span_per_request_with_its_outcome_and_cache_events(
        notifier: OtelNotifier, spans: InMemorySpanExporter,
        reader: InMemoryMetricReader) -> None:
    from ivcache.adapters.memory import InMemoryImageSource, InMemoryUnitOfWork
    from ivcache.adapters.storage.fake_lvm import FakeLvmStorage
    from ivcache.core.model import GIB, Image, RequestContext
    from ivcache.core.policy import CachePolicy
    from ivcache.core.service import CacheService

    images = InMemoryImageSource()
    for name in ("a", "b"):
        images.add(Image(id=name, name=name, virtual_size=GIB), name.encode() * 100)
    service = CacheService(host="node-1", storage=FakeLvmStorage(), images=images,
                           uow=InMemoryUnitOfWork(), notifier=notifier, tracer=notifier,
                           policy=CachePolicy(max_count=1))
    ctx = RequestContext.for_project("p")
    service.create_volume(ctx, "a", 1)
    service.create_volume(ctx, "a", 1)
    service.create_volume(ctx, "b", 1)

    requests = [s for s in spans.get_finished_spans() if s.name == "ivcache.create_volume"]
    assert [(s.attributes or {}).get("outcome") for s in requests] == ["miss", "hit", "miss"]
    assert all((s.attributes or {}).get("host") == "node-1" for s in requests)
    names = [[e.name for e in s.events] for s in requests]
    assert "image_volume_cache.miss" in names[0] and "image_volume_cache.create" in names[0]
    assert names[1] == ["image_volume_cache.hit"]
    assert "image_volume_cache.evict" in names[2]
    assert sum(counter(reader, "ivcache.cache.hits").values()) == 1
    assert sum(counter(reader, "ivcache.cache.misses").values()) == 2
    assert sum(counter(reader, "ivcache.cache.evictions").values()) == 1
