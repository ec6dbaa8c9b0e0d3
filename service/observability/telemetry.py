"""Per-request telemetry for the service layer: one `RequestTelemetry` follows
a chat request from arrival to its end and records the service-level metrics
and the request's spans. Transports never call it; ChatService does, so the
gRPC and HTTP transports report the same numbers.

Span tree of one request (the server span is the transport's):

    <transport server span>
      chat <model>            gen_ai.* request/response/usage attributes
        queue                 engine submit -> KV-slot admission
        prefill               admission -> first token
        decode                first token -> final event
"""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ..engine.types import FinishReason, GenerationRequest, TokenEvent
from ..errors import ErrorCode, ServiceError
from .metrics import Metrics, ModelMetrics
from .tracing import SpanClock, add_timed_span

_REASON_BY_CODE = {
    ErrorCode.INVALID_ARGUMENT: "validation",
    ErrorCode.NOT_FOUND: "validation",  # an unknown model name is a bad request field
    ErrorCode.RESOURCE_EXHAUSTED: "overloaded",
    ErrorCode.UNAVAILABLE: "unavailable",
    ErrorCode.DEADLINE_EXCEEDED: "deadline",
    ErrorCode.INTERNAL: "internal",
}
# Failures that are the server's fault mark the chat span as an error;
# bad requests, overload and client cancellations do not.
_ERROR_REASONS = frozenset({"unavailable", "deadline", "internal"})
# The engine, the transport and the client notice an expired deadline at
# slightly different moments; within this margin an end counts as the deadline.
DEADLINE_SLACK_SECONDS = 0.05


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, ServiceError):
        return _REASON_BY_CODE.get(exc.code, "internal")
    return "internal"


class Telemetry:
    """The service's handle on metrics (for one served model) and tracing."""

    def __init__(self, metrics: ModelMetrics, tracer: trace.Tracer | None = None) -> None:
        self.metrics = metrics
        self.tracer = tracer if tracer is not None else trace.NoOpTracer()

    @classmethod
    def standalone(cls, model: str) -> Telemetry:
        """Metrics on a private registry, no tracing (for embedding and tests)."""
        return cls(Metrics().for_model(model))

    def start(self, arrival: float) -> RequestTelemetry:
        return RequestTelemetry(self, arrival)


class RequestTelemetry:
    """Created when a request arrives; exactly one of `on_event(final)` or
    `fail()` settles it (later calls are ignored)."""

    __slots__ = (
        "_t",
        "_m",
        "_arrival",
        "_clock",
        "_span",
        "_tokens",
        "_last_token_at",
        "_prompt_len",
        "_deadline",
        "_done",
    )

    def __init__(self, telemetry: Telemetry, arrival: float) -> None:
        self._t = telemetry
        self._m = telemetry.metrics
        self._arrival = arrival
        self._clock = SpanClock()  # one conversion for all of this request's spans
        # Child of the current span (the transport's server span), if any.
        self._span = telemetry.tracer.start_span(
            "chat", kind=SpanKind.INTERNAL, start_time=self._clock.epoch_ns(arrival)
        )
        self._tokens = 0
        self._last_token_at = 0.0
        self._prompt_len = 0
        self._deadline: float | None = None
        self._done = False

    @property
    def span(self) -> trace.Span:
        return self._span

    def prepared(self, request: GenerationRequest, model: str) -> None:
        self._prompt_len = len(request.prompt_token_ids)
        self._deadline = request.deadline
        span = self._span
        if span.is_recording():
            s = request.sampling
            span.update_name(f"chat {model}")
            span.set_attributes(
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.request.model": model,
                    "gen_ai.request.max_tokens": s.max_tokens,
                    "gen_ai.request.temperature": s.temperature,
                    "gen_ai.request.top_p": s.top_p,
                    "gen_ai.request.top_k": s.top_k,
                    "gen_ai.response.id": request.request_id,
                    "gen_ai.response.model": self._m.model,
                    "gen_ai.usage.input_tokens": self._prompt_len,
                }
            )
            if s.seed is not None:
                span.set_attribute("gen_ai.request.seed", s.seed)

    def on_event(self, event: TokenEvent, now: float) -> None:
        """Every engine event, as it reaches the service (on the event loop)."""
        if self._done:
            return
        m = self._m
        if event.finished:
            new_tokens = max(0, (event.usage.completion_tokens if event.usage else 0) - self._tokens)
        else:
            new_tokens = 1  # each non-final event is exactly one token
        if new_tokens:
            if self._tokens == 0:
                m.time_to_first_token.observe(now - self._arrival)
                m.prompt_tokens.inc(self._prompt_len)
            else:
                m.inter_token_latency.observe(now - self._last_token_at)
            self._last_token_at = now
            self._tokens += new_tokens
            m.generation_tokens.inc(new_tokens)
        if event.finished:
            self._finish(event, now)

    def _finish(self, event: TokenEvent, now: float) -> None:
        self._done = True
        m = self._m
        reason = event.finish_reason
        if reason is FinishReason.STOP or reason is FinishReason.LENGTH:
            m.finished[reason.value].inc()
            outcome = reason.value
        else:  # CANCELLED by the engine: an expired deadline or a shutdown
            outcome = self._cancel_reason(now)
            m.failed[outcome].inc()
        m.e2e_latency.observe(now - self._arrival)
        usage = event.usage
        if usage is not None:
            m.request_prompt_tokens.observe(usage.prompt_tokens)
            m.request_generation_tokens.observe(usage.completion_tokens)
        timing = event.timing
        if timing is not None:
            if timing.admitted is not None:
                m.queue_time.observe(timing.admitted - timing.submitted)
                if timing.first_token is not None:
                    m.prefill_time.observe(timing.first_token - timing.admitted)
                    m.decode_time.observe(timing.finished - timing.first_token)
        span = self._span
        if span.is_recording():
            span.set_attributes(
                {"gen_ai.response.finish_reasons": (outcome,), "gen_ai.usage.output_tokens": self._tokens}
            )
            if outcome not in ("stop", "length"):
                self._mark_failed(outcome, None)
            if timing is not None:
                self._phase_spans(timing)
            span.end(end_time=self._clock.epoch_ns(now))

    def _phase_spans(self, timing) -> None:
        tracer, span, clock = self._t.tracer, self._span, self._clock
        queue_end = timing.admitted if timing.admitted is not None else timing.finished
        add_timed_span(tracer, "queue", span, timing.submitted, queue_end, clock)
        if timing.admitted is None:
            return
        prefill_end = timing.first_token if timing.first_token is not None else timing.finished
        add_timed_span(
            tracer,
            "prefill",
            span,
            timing.admitted,
            prefill_end,
            clock,
            {"gen_ai.usage.input_tokens": self._prompt_len},
        )
        if timing.first_token is not None:
            add_timed_span(
                tracer,
                "decode",
                span,
                timing.first_token,
                timing.finished,
                clock,
                {"gen_ai.usage.output_tokens": self._tokens},
            )

    def _cancel_reason(self, now: float) -> str:
        deadline = self._deadline
        return "deadline" if deadline is not None and now >= deadline - DEADLINE_SLACK_SECONDS else "cancelled"

    def _mark_failed(self, reason: str, exc: BaseException | None) -> None:
        span = self._span
        span.set_attribute("error.type", reason)
        if exc is not None:
            span.record_exception(exc)
        if reason in _ERROR_REASONS:
            span.set_status(Status(StatusCode.ERROR, str(exc) if exc is not None else reason))

    def fail(self, exc: BaseException) -> None:
        """The request failed with `exc` (a ServiceError or anything else)."""
        self._settle(failure_reason(exc), exc)

    def abandoned(self) -> None:
        """The consumer stopped before the final event: the client cancelled,
        its deadline passed, or the transport went away."""
        self._settle(self._cancel_reason(time.monotonic()), None)

    def _settle(self, reason: str, exc: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        self._m.failed[reason].inc()
        span = self._span
        if span.is_recording():
            span.set_attribute("gen_ai.usage.output_tokens", self._tokens)
            self._mark_failed(reason, exc)
            span.end(end_time=self._clock.epoch_ns(time.monotonic()))
