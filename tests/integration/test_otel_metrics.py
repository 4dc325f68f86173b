"""The metrics in OTel's conventions, through a real service, and the SDK set up from config."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
)

from ivcache.adapters.memory import InMemoryImageSource, InMemoryUnitOfWork
from ivcache.adapters.notify import MultiNotifier
from ivcache.adapters.notify.otel import MeteredStorage, OtelNotifier
from ivcache.adapters.storage.fake_lvm import FakeLvmStorage
from ivcache.core.model import GIB, Image, RequestContext
from ivcache.core.policy import CachePolicy
from ivcache.core.service import CacheService
from ivcache.entrypoints.bootstrap import build_notifier, wire
from ivcache.entrypoints.config import load_config


def _metrics(reader: InMemoryMetricReader) -> dict[str, Metric]:
    data = reader.get_metrics_data()
    assert data is not None
    return {m.name: m for r in data.resource_metrics for s in r.scope_metrics
            for m in s.metrics}


def _points(metric: Metric) -> dict[frozenset[tuple[str, object]], object]:
    out: dict[frozenset[tuple[str, object]], object] = {}
    for point in metric.data.data_points:
        key = frozenset((point.attributes or {}).items())
        if isinstance(point, HistogramDataPoint):
            out[key] = point.count
        else:
            assert isinstance(point, NumberDataPoint)
            out[key] = point.value
    return out


@pytest.fixture
def world() -> Iterator[tuple[CacheService, InMemoryMetricReader]]:
    reader = InMemoryMetricReader()
    otel = OtelNotifier(meter_provider=MeterProvider(metric_readers=[reader]))
    images = InMemoryImageSource()
    for name in ("a", "b"):
        images.add(Image(id=name, name=name, virtual_size=GIB), name.encode() * 1000)
    service = CacheService(host="node-1",
                           storage=MeteredStorage(FakeLvmStorage(), otel, "node-1"),
                           images=images, uow=InMemoryUnitOfWork(), notifier=otel,
                           tracer=otel, policy=CachePolicy(max_count=1))
    otel.totals = lambda: [service.stats()]
    yield service, reader


def test_requests_evictions_downloads_clones_and_the_cache_size_are_measured(
        world: tuple[CacheService, InMemoryMetricReader]) -> None:
    service, reader = world
    ctx = RequestContext.for_project("p")
    for image_id in ("a", "a", "a", "b"):  # miss, hit, hit, miss that evicts a
        service.create_volume(ctx, image_id, 1)
    found = _metrics(reader)
    host = ("host", "node-1")
    assert _points(found["ivcache.cache.requests"]) == {
        frozenset({host, ("outcome", "hit")}): 2, frozenset({host, ("outcome", "miss")}): 2}
    assert _points(found["ivcache.cache.evictions"]) == {
        frozenset({host, ("reason", "lru")}): 1}
    assert _points(found["ivcache.bytes_downloaded"]) == {frozenset({host}): 2000}
    assert _points(found["ivcache.download.duration"]) == {frozenset({host}): 2}
    # every create clones from a cache volume: two hits and two fills
    assert _points(found["ivcache.clone.duration"]) == {frozenset({host}): 4}
    # The gauges are per scope: this service's, node-1 on the implicit backend.
    scope = ("scope", "node-1@default#default")
    assert _points(found["ivcache.cache.entries"]) == {frozenset({scope}): 1}
    assert _points(found["ivcache.cache.size"]) == {frozenset({scope}): 1}


def test_names_and_units_follow_otels_conventions(
        world: tuple[CacheService, InMemoryMetricReader]) -> None:
    service, reader = world
    service.create_volume(RequestContext.for_project("p"), "a", 1)
    units = {name: m.unit for name, m in _metrics(reader).items()}
    assert units["ivcache.cache.requests"] == "{request}"
    assert units["ivcache.bytes_downloaded"] == "By"
    assert units["ivcache.download.duration"] == units["ivcache.clone.duration"] == "s"
    assert units["ivcache.cache.entries"] == "{entry}"
    assert units["ivcache.cache.size"] == "GiBy"
    for name in units:
        assert name == name.lower() and name.startswith("ivcache.")
        assert not name.endswith(("_total", ".seconds", "_seconds")), name


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ivcache.ini"
    path.write_text(text, encoding="utf-8")
    return path


def test_an_exporter_in_the_config_implies_the_otel_notifier(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, "[ivcache]\nnotifier = log\n"
                                           "otel_exporter = console\n"), env={})
    assert config.notifiers == ("log", "otel")
    notifier, tracer = build_notifier(config)
    assert isinstance(notifier, MultiNotifier) and isinstance(tracer, OtelNotifier)
    assert tracer in notifier.notifiers
    tracer.close()


def test_console_exports_metrics_on_stderr_at_close(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from ivcache.core.events import CacheHit

    config = load_config(_config(tmp_path, "[ivcache]\nnotifier = none\n"
                                           "otel_exporter = console\nstorage = fake-lvm\n"),
                         env={})
    wiring = wire(config)
    assert isinstance(wiring.service.tracer, OtelNotifier)
    wiring.service.notifier.publish(CacheHit("img-1", config.host))
    wiring.close()
    out, err = capsys.readouterr()
    assert out == ""
    assert '"ivcache.cache.requests"' in err and '"ivcache.cache.entries"' in err


class _Collector(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Collector.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_otlp_sends_the_metrics_to_the_configured_collector(tmp_path: Path) -> None:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )

    from ivcache.core.events import CacheHit

    server = http.server.HTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        config = load_config(_config(tmp_path, f"""[DEFAULT]
host = node-9
[ivcache]
notifier = none
otel_exporter = otlp
otel_endpoint = http://127.0.0.1:{port}
storage = fake-lvm
"""), env={})
        wiring = wire(config)
        wiring.service.notifier.publish(CacheHit("img-1", "node-9"))
        wiring.close()
    finally:
        server.shutdown()
        server.server_close()
    bodies = [body for path, body in _Collector.received if path == "/v1/metrics"]
    assert bodies
    names = set()
    for body in bodies:
        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        for resource in request.resource_metrics:
            attrs = {a.key: a.value.string_value for a in resource.resource.attributes}
            assert attrs["service.name"] == "ivcache" and attrs["host.name"] == "node-9"
            names |= {m.name for s in resource.scope_metrics for m in s.metrics}
    assert {"ivcache.cache.requests", "ivcache.cache.entries", "ivcache.cache.size"} <= names
