"""Every Prometheus metric of the service, defined once, here.

`Metrics` owns a private CollectorRegistry (nothing is registered on
prometheus_client's global REGISTRY) and is passed down explicitly:

* service level (`qwen_*`, one `model` label): recorded by the service layer
  through `ModelMetrics`, so every transport (gRPC, HTTP) shares them;
* gRPC transport (`grpc_server_*`, the go-grpc-prometheus shape): recorded by
  the gRPC interceptor through `GrpcServerMetrics`;
* process (`process_*`, `python_info`): prometheus_client's collectors, read at
  scrape time.

The engine never imports this module: `ModelMetrics` is handed to it as a
plain `EngineObserver`, and the load gauges read `Engine.stats()` at scrape
time, so nothing here runs per token on the compute thread.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from ..engine.types import EngineSetup
from . import ObservabilityError

if TYPE_CHECKING:
    from ..engine.types import EngineStats

_LOG = logging.getLogger(__name__)

# qwen_engine_info's labels besides `model`: every field of EngineSetup.
ENGINE_FACTS = tuple(field.name for field in dataclasses.fields(EngineSetup))

# Latencies: 5 ms .. 60 s, at least two buckets per doubling between 10 ms and 30 s.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    60.0,
)
# Whole requests and streams last longer: up to 10 minutes.
DURATION_BUCKETS = LATENCY_BUCKETS + (120.0, 300.0, 600.0)
# Inter-token latency on CPU is 5-150 ms per step; finer at the low end.
INTER_TOKEN_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.06,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
TOKEN_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)

FINISH_REASONS = ("stop", "length")
# Why a request did not complete. Bounded: transports and the service map
# every failure onto one of these.
FAILURE_REASONS = ("validation", "overloaded", "unavailable", "cancelled", "deadline", "internal")

# grpc.StatusCode -> the code names go-grpc-prometheus uses ("OK", "InvalidArgument", ...).
GRPC_CODE_NAMES = {
    "OK": "OK",
    "CANCELLED": "Canceled",
    "UNKNOWN": "Unknown",
    "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded",
    "NOT_FOUND": "NotFound",
    "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied",
    "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition",
    "ABORTED": "Aborted",
    "OUT_OF_RANGE": "OutOfRange",
    "UNIMPLEMENTED": "Unimplemented",
    "INTERNAL": "Internal",
    "UNAVAILABLE": "Unavailable",
    "DATA_LOSS": "DataLoss",
    "UNAUTHENTICATED": "Unauthenticated",
}


class Metrics:
    """All metric families on one registry. Create one per server process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # `*_created` series double the series count and no dashboard reads
        # them (a process-wide switch of prometheus_client).
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        PlatformCollector(registry=r)  # python_info
        m = ("model",)

        # --- latency, per request -----------------------------------------
        self.time_to_first_token = Histogram(
            "qwen_time_to_first_token_seconds",
            "Time from the request's arrival at the service (before tokenization) to its first generated token.",
            m,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.inter_token_latency = Histogram(
            "qwen_inter_token_latency_seconds",
            "Time between two consecutive generated tokens of one request (one sample per token after the first).",
            m,
            registry=r,
            buckets=INTER_TOKEN_BUCKETS,
        )
        self.queue_time = Histogram(
            "qwen_request_queue_time_seconds",
            "Time a request waited for a KV-cache slot (engine submit to admission).",
            m,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.prefill_time = Histogram(
            "qwen_request_prefill_time_seconds",
            "Time from admission to the first token (prompt prefill, interleaved with other requests' decode steps).",
            m,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.decode_time = Histogram(
            "qwen_request_decode_time_seconds",
            "Time from the first token to the last.",
            m,
            registry=r,
            buckets=DURATION_BUCKETS,
        )
        self.e2e_latency = Histogram(
            "qwen_e2e_request_latency_seconds",
            "Time from the request's arrival to its final event.",
            m,
            registry=r,
            buckets=DURATION_BUCKETS,
        )
        # --- tokens ---------------------------------------------------------
        self.prompt_tokens = Counter(
            "qwen_prompt_tokens",
            "Prompt tokens prefilled (counted when a request's first token is generated).",
            m,
            registry=r,
        )
        self.generation_tokens = Counter(
            "qwen_generation_tokens",
            "Tokens generated (counted as each token reaches the service).",
            m,
            registry=r,
        )
        self.request_prompt_tokens = Histogram(
            "qwen_request_prompt_tokens",
            "Prompt length of requests that received a final event.",
            m,
            registry=r,
            buckets=TOKEN_COUNT_BUCKETS,
        )
        self.request_generation_tokens = Histogram(
            "qwen_request_generation_tokens",
            "Output length of requests that received a final event.",
            m,
            registry=r,
            buckets=TOKEN_COUNT_BUCKETS,
        )
        # --- engine load (read from the engine at scrape time) -------------
        self.requests_running = Gauge(
            "qwen_requests_running", "Requests holding a KV-cache slot (prefilling or decoding).", m, registry=r
        )
        self.requests_waiting = Gauge("qwen_requests_waiting", "Requests queued for a KV-cache slot.", m, registry=r)
        self.requests_running_limit = Gauge(
            "qwen_requests_running_limit", "Most requests decoded together (--max-batch-size).", m, registry=r
        )
        self.requests_waiting_limit = Gauge(
            "qwen_requests_waiting_limit",
            "Most requests that may wait; beyond it calls are rejected as overloaded (--max-waiting).",
            m,
            registry=r,
        )
        self.kv_cache_usage = Gauge(
            "qwen_kv_cache_usage_ratio",
            "Fraction of KV-cache positions holding tokens (0..1).",
            m,
            registry=r,
        )
        self.prefix_cache_hit_tokens = Counter(
            "qwen_prefix_cache_hit_tokens",
            "Prompt tokens whose KV was reused from the prefix cache instead of computed (divide by "
            "qwen_prompt_tokens_total for the hit ratio).",
            m,
            registry=r,
        )
        self.prefix_cache_blocks_used = Gauge(
            "qwen_prefix_cache_blocks_used", "Blocks of 16 KV positions held by the prefix cache.", m, registry=r
        )
        self.prefix_cache_blocks_limit = Gauge(
            "qwen_prefix_cache_blocks_limit",
            "Blocks the prefix cache may hold (--prefix-cache-mb; 0 with --no-prefix-caching).",
            m,
            registry=r,
        )
        self.prefix_cache_evictions = Counter(
            "qwen_prefix_cache_evictions",
            "Prefix-cache blocks evicted (least recently used) to make room for new ones.",
            m,
            registry=r,
        )
        self.speculative_draft_tokens = Counter(
            "qwen_speculative_draft_tokens",
            "Prompt-lookup draft tokens verified by speculative decoding (--speculative-tokens).",
            m,
            registry=r,
        )
        self.speculative_accepted_tokens = Counter(
            "qwen_speculative_accepted_tokens",
            "Of the draft tokens, those accepted (each a token generated without a pass of its own; divide by "
            "qwen_speculative_draft_tokens_total for the acceptance rate).",
            m,
            registry=r,
        )
        self.compute_threads = Gauge(
            "qwen_engine_compute_threads",
            "Threads the engine's forward passes run on: --threads, or fewer while the host keeps them off their "
            "cores (neighbours on the node); below --threads means the replica is slowed by its node.",
            m,
            registry=r,
        )
        self.engine = Info(
            "qwen_engine",
            "What the engine settled on at start-up, in its labels (value 1): quantization as resolved, and as "
            "requested (--quantization: auto is decided per node, so replicas may differ); native_layers true when "
            "the decoder layers run in the native CPU kernels (false: torch operations, several times slower); "
            "kernels what the products run on: avx512-amx (avx512-vnni, with the int8 products of prompts on AMX "
            "tiles: prompt passes ~0.9x the time), avx512-vnni (prompts and batches about 1.5x faster than avx2), "
            "avx2, or torch.",
            m,
            registry=r,
        )
        self.decode_batch_size = Histogram(
            "qwen_decode_batch_size",
            "Requests decoded together, one sample per engine decode step.",
            m,
            registry=r,
            buckets=BATCH_SIZE_BUCKETS,
        )
        # --- outcomes ---------------------------------------------------------
        self.requests_finished = Counter(
            "qwen_requests_finished",
            "Requests that completed, by finish_reason (stop: end of sequence or a stop string; length: max_tokens "
            "or the context window).",
            ("model", "finish_reason"),
            registry=r,
        )
        self.requests_failed = Counter(
            "qwen_requests_failed",
            "Requests that did not complete, by reason: validation, overloaded, unavailable, cancelled "
            "(by the client or shutdown), deadline, internal.",
            ("model", "reason"),
            registry=r,
        )
        self.grpc = GrpcServerMetrics(r)

    def for_model(self, model: str) -> ModelMetrics:
        return ModelMetrics(self, model)


class ModelMetrics:
    """The service-level metrics with the `model` label bound; the children
    are created up front, so recording is one lock-protected add each.
    Also the engine's observer (decode batch size)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.model = model
        self.time_to_first_token = metrics.time_to_first_token.labels(model)
        self.inter_token_latency = metrics.inter_token_latency.labels(model)
        self.queue_time = metrics.queue_time.labels(model)
        self.prefill_time = metrics.prefill_time.labels(model)
        self.decode_time = metrics.decode_time.labels(model)
        self.e2e_latency = metrics.e2e_latency.labels(model)
        self.prompt_tokens = metrics.prompt_tokens.labels(model)
        self.generation_tokens = metrics.generation_tokens.labels(model)
        self.request_prompt_tokens = metrics.request_prompt_tokens.labels(model)
        self.request_generation_tokens = metrics.request_generation_tokens.labels(model)
        self.decode_batch_size = metrics.decode_batch_size.labels(model)
        self.prefix_cache_hit_tokens = metrics.prefix_cache_hit_tokens.labels(model)
        self.prefix_cache_evictions = metrics.prefix_cache_evictions.labels(model)
        self.speculative_draft_tokens = metrics.speculative_draft_tokens.labels(model)
        self.speculative_accepted_tokens = metrics.speculative_accepted_tokens.labels(model)
        self._prefix_cache_blocks_used = metrics.prefix_cache_blocks_used.labels(model)
        self._prefix_cache_blocks_limit = metrics.prefix_cache_blocks_limit.labels(model)
        self._running = metrics.requests_running.labels(model)
        self._waiting = metrics.requests_waiting.labels(model)
        self._running_limit = metrics.requests_running_limit.labels(model)
        self._waiting_limit = metrics.requests_waiting_limit.labels(model)
        self._kv_usage = metrics.kv_cache_usage.labels(model)
        self._compute_threads = metrics.compute_threads.labels(model)
        self._engine = metrics.engine.labels(model)
        self.finished = {reason: metrics.requests_finished.labels(model, reason) for reason in FINISH_REASONS}
        self.failed = {reason: metrics.requests_failed.labels(model, reason) for reason in FAILURE_REASONS}

    # EngineObserver: called on the compute thread.
    def decode_step(self, batch_size: int) -> None:
        self.decode_batch_size.observe(batch_size)

    def prefix_reused(self, tokens: int) -> None:
        self.prefix_cache_hit_tokens.inc(tokens)

    def prefix_blocks_evicted(self, count: int) -> None:
        self.prefix_cache_evictions.inc(count)

    def draft_tokens(self, count: int) -> None:
        self.speculative_draft_tokens.inc(count)

    def accepted_draft_tokens(self, count: int) -> None:
        self.speculative_accepted_tokens.inc(count)

    def track_engine(
        self, setup: EngineSetup, stats: Callable[[], EngineStats], *, max_running: int, max_waiting: int
    ) -> None:
        """qwen_engine_info from `setup`; load gauges read `stats()` (an EngineStats) whenever Prometheus scrapes."""
        self._engine.info({name: str(value).lower() for name, value in dataclasses.asdict(setup).items()})
        self._running.set_function(lambda: stats().running)
        self._waiting.set_function(lambda: stats().waiting)

        def kv_usage() -> float:
            s = stats()
            return s.kv_cache_used_tokens / s.kv_cache_capacity_tokens if s.kv_cache_capacity_tokens else 0.0

        self._kv_usage.set_function(kv_usage)
        self._prefix_cache_blocks_used.set_function(lambda: stats().prefix_cache_blocks_used)
        self._prefix_cache_blocks_limit.set_function(lambda: stats().prefix_cache_blocks_capacity)
        self._compute_threads.set_function(lambda: stats().compute_threads)
        self._running_limit.set(max_running)
        self._waiting_limit.set(max_waiting)


class GrpcServerMetrics:
    """go-grpc-prometheus' server metrics, so existing gRPC dashboards apply."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("grpc_type", "grpc_service", "grpc_method")
        self.started = Counter("grpc_server_started", "RPCs started on the server.", labels, registry=registry)
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            labels + ("grpc_code",),
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the handler's start to its end (the whole stream for streaming RPCs).",
            labels,
            registry=registry,
            buckets=DURATION_BUCKETS,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received", "Request messages received by the server.", labels, registry=registry
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent", "Response messages sent by the server.", labels, registry=registry
        )


class MetricsServer:
    """/metrics over HTTP on its own port (a daemon thread of prometheus_client)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise ObservabilityError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _bucket_text(bounds: list[float], unit: str) -> str:
    finite = [b for b in bounds if b != float("inf")]

    def show(value: float) -> str:
        if unit == "s" and value < 1:
            return f"{value * 1000:g} ms"
        return f"{value:g}{' s' if unit == 's' else ''}"

    return f"{len(finite)} buckets, {show(finite[0])} … {show(finite[-1])}"


def metrics_table() -> str:
    """The README's metric reference, generated from the definitions above
    (`python -m service.observability.metrics`; a test checks the docs)."""
    metrics = Metrics(CollectorRegistry())
    families = [m for m in (*vars(metrics).values(), *vars(metrics.grpc).values()) if hasattr(m, "_labelnames")]
    # An Info's own labels are set per sample, not declared: name them here.
    info_labels = {metrics.engine: ENGINE_FACTS}
    rows = ["| metric | type | labels | buckets | meaning |", "|---|---|---|---|---|"]
    for family in families:
        kind = family._type
        name = family._name + {"counter": "_total", "info": "_info"}.get(kind, "")
        unit = "s" if name.endswith("_seconds") else ""
        buckets = _bucket_text(family._upper_bounds, unit) if kind == "histogram" else ""
        facts = info_labels[family] if kind == "info" else ()
        labels = ", ".join(f"`{label}`" for label in (*family._labelnames, *facts))
        rows.append(f"| `{name}` | {kind} | {labels} | {buckets} | {family._documentation} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(metrics_table())
