"""W3C trace context for outgoing calls, only when OpenTelemetry is in use.

OpenTelemetry is optional: the SDK works without it installed. When the
`opentelemetry` package is importable and a valid span is current, each call
carries `traceparent` (and `tracestate` if set), so the server's spans join
the caller's trace.
"""

from __future__ import annotations

try:
    from opentelemetry import trace as _otel_trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _PROPAGATOR: TraceContextTextMapPropagator | None = TraceContextTextMapPropagator()
except ImportError:  # OpenTelemetry not installed: nothing to propagate
    _otel_trace = None  # type: ignore[assignment]  # only read when _PROPAGATOR is set
    _PROPAGATOR = None


def traceparent_metadata() -> list[tuple[str, str]]:
    """[("traceparent", ...), maybe ("tracestate", ...)] for the current span,
    or [] without OpenTelemetry or without a valid current span."""
    if _PROPAGATOR is None or not _otel_trace.get_current_span().get_span_context().is_valid:
        return []
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return sorted(carrier.items())
