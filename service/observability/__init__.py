"""Metrics (Prometheus), tracing (OpenTelemetry) and the per-request telemetry that joins them."""


class ObservabilityError(Exception):
    """Bad metrics or tracing configuration (a taken metrics port, an
    unsupported OTEL_* exporter): the server refuses to start."""
