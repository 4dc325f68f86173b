"""The OpenTelemetry SDK set up from ivcache's config: ``[ivcache] otel_exporter``.

``none`` leaves the API's globals to the application (nothing is exported unless it set an
SDK up); ``console`` prints spans and metrics on stderr (stdout is the CLI's JSON);
``otlp`` sends them to an OpenTelemetry collector over OTLP/HTTP (``otel_endpoint``, e.g.
``http://collector:4318``; empty: the exporter's own default and ``OTEL_EXPORTER_OTLP_*``
variables). Needs ``pip install 'ivcache[otel]'``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from ivcache.core.errors import ConfigError

__all__ = ["EXPORTERS", "Providers", "build_providers"]

EXPORTERS = ("none", "console", "otlp")

#: a tracer provider, a meter provider, and what flushes and shuts both down
Providers = tuple[TracerProvider, MeterProvider, Callable[[], None]]


def build_providers(exporter: str, endpoint: str = "", *,
                    service_name: str = "ivcache", host: str = "") -> Providers:
    """SDK providers exporting to ``exporter`` (``console`` or ``otlp``)."""
    try:
        from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            MetricExporter,
            PeriodicExportingMetricReader,
        )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )
    except ImportError as exc:
        raise ConfigError(f"otel_exporter = {exporter} needs the OpenTelemetry SDK: pip "
                          f"install 'ivcache[otel]' ({exc})") from exc
    metric_exporter: MetricExporter
    span_exporter: SpanExporter
    if exporter == "console":
        metric_exporter = ConsoleMetricExporter(out=sys.stderr)
        span_exporter = ConsoleSpanExporter(out=sys.stderr)
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )
        except ImportError as exc:
            raise ConfigError("otel_exporter = otlp needs the OTLP exporter: pip install "
                              f"'ivcache[otel]' ({exc})") from exc
        base = endpoint.rstrip("/")
        metric_exporter = OTLPMetricExporter(endpoint=f"{base}/v1/metrics" if base else None)
        span_exporter = OTLPSpanExporter(endpoint=f"{base}/v1/traces" if base else None)
    else:
        raise ConfigError(f"otel_exporter = {exporter!r} is not one of {', '.join(EXPORTERS)}")
    attributes = {"service.name": service_name}
    if host:
        attributes["host.name"] = host
    resource = Resource.create(attributes)
    tracer_provider = SdkTracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
    meter_provider = SdkMeterProvider(
        resource=resource, metric_readers=[PeriodicExportingMetricReader(metric_exporter)])

    def shutdown() -> None:
        # Shutdown flushes: a CLI process exports its spans and metrics once, at its end.
        tracer_provider.shutdown()
        meter_provider.shutdown()

    return tracer_provider, meter_provider, shutdown
