"""OpenTelemetry tracing, configured only by the standard OTEL_* variables.

Off unless OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
OTEL_TRACES_EXPORTER is set (OTEL_TRACES_EXPORTER=none and OTEL_SDK_DISABLED=true
turn it off again). When off, a no-op tracer is handed out and spans cost a
few attribute checks. The SDK itself reads the rest of the standard variables:
OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default parentbased_always_on),
OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_* (endpoint,
headers, insecure, timeout, compression, certificates), OTEL_BSP_* (batching),
OTEL_PROPAGATORS (default tracecontext,baggage).

The provider is not installed globally: the `Tracer` is passed down like the
metrics. Propagation uses the global propagator (W3C traceparent by default),
which is what lets a caller's trace continue through gRPC metadata.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.util.types import AttributeValue

from . import ObservabilityError

_LOG = logging.getLogger(__name__)

TRACER_NAME = "qwen_grpc"
DEFAULT_SERVICE_NAME = "qwen-grpc"
SUPPORTED_EXPORTERS = ("otlp", "console")


def _env_true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def tracing_requested(env: Mapping[str, str]) -> bool:
    """Whether the OTEL_* variables ask for trace export."""
    if _env_true(env.get("OTEL_SDK_DISABLED")):
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER")
    if exporters is not None and exporters.strip():
        return any(name.strip().lower() not in ("", "none") for name in exporters.split(","))
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    names = [n for n in names if n and n != "none"] or ["otlp"]
    unknown = [n for n in names if n not in SUPPORTED_EXPORTERS]
    if unknown:
        raise ObservabilityError(f"OTEL_TRACES_EXPORTER: unsupported {', '.join(unknown)} (supported: otlp, console)")
    return names


class Tracing:
    """The tracer the server passes down, and the provider to flush at exit."""

    def __init__(self, tracer: trace.Tracer, provider=None) -> None:
        self.tracer = tracer
        self._provider = provider

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    def shutdown(self) -> None:
        """Export what is buffered and stop (called once, at server exit)."""
        if self._provider is not None:
            self._provider.shutdown()


def disabled() -> Tracing:
    return Tracing(trace.NoOpTracer())


def setup_tracing(*, version: str = "") -> Tracing:
    """A Tracing from the OTEL_* environment variables (the SDK reads them
    from os.environ too: sampler, resource, exporter endpoint and options)."""
    env = os.environ
    if not tracing_requested(env):
        return disabled()
    from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
    defaults = {}
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        defaults[SERVICE_NAME] = DEFAULT_SERVICE_NAME
    if SERVICE_INSTANCE_ID not in resource.attributes:
        defaults[SERVICE_INSTANCE_ID] = socket.gethostname()  # the pod name in Kubernetes
    if version and SERVICE_VERSION not in resource.attributes:
        defaults[SERVICE_VERSION] = version
    resource = resource.merge(Resource(defaults))
    provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER(_ARG)
    for name in _exporter_names(env):
        exporter: SpanExporter
        if name == "otlp":
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
            if protocol != "grpc":
                raise ObservabilityError(f"OTLP protocol {protocol!r} is not supported; use grpc (port 4317)")
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    _LOG.info(
        "tracing on: exporter %s, endpoint %s, sampler %s",
        ",".join(_exporter_names(env)),
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "(default)",
        env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
    )
    return Tracing(provider.get_tracer(TRACER_NAME, version or None), provider)


class SpanClock:
    """Converts time.monotonic() stamps (what the engine records) to the
    epoch nanoseconds spans carry, using one reading of both clocks."""

    def __init__(self) -> None:
        self._offset_ns = time.time_ns() - time.monotonic_ns()

    def epoch_ns(self, monotonic: float) -> int:
        return int(monotonic * 1e9) + self._offset_ns


def add_timed_span(
    tracer: trace.Tracer,
    name: str,
    parent: trace.Span,
    start: float,
    end: float,
    clock: SpanClock,
    attributes: Mapping[str, AttributeValue] | None = None,
) -> None:
    """A finished child span of `parent` over [start, end] (monotonic seconds)."""
    span = tracer.start_span(
        name,
        context=trace.set_span_in_context(parent),
        start_time=clock.epoch_ns(start),
        attributes=dict(attributes or {}),
    )
    span.end(end_time=clock.epoch_ns(max(start, end)))


def extract_context(metadata: Iterable[tuple[str, object]] | None) -> Context:
    """The caller's trace context from gRPC invocation metadata (or any
    header pairs): W3C traceparent/tracestate by default."""
    carrier: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, str):  # binary (-bin) entries carry no text propagation headers
            carrier[key.lower()] = value
    return propagate.extract(carrier)
