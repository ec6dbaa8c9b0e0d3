"""Traces through the real exporter: a server (tiny model) exports over
OTLP/gRPC to a receiver built in the test; the caller's W3C trace context
arrives in gRPC metadata and the server's spans continue that trace."""

from __future__ import annotations

import os
import secrets

import grpc
import pytest
from harness import running_server
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otlp_receiver import OtlpTraceReceiver

from qwen_grpc_client import QwenClient, build_request
from service.observability import ObservabilityError
from service.observability.tracing import setup_tracing, tracing_requested

SERVICE_NAME = "qwen-trace-test"
# Root requests are never sampled (ratio 0), requests whose caller sampled
# are: the sampler comes from OTEL_TRACES_SAMPLER(_ARG), parent-based.
TRACING_ENV = {
    "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
    "OTEL_TRACES_SAMPLER_ARG": "0",
    "OTEL_SERVICE_NAME": SERVICE_NAME,
    "OTEL_BSP_SCHEDULE_DELAY": "100",
}
TOLERANCE_NS = 2_000_000  # wall-clock vs monotonic conversion between the server span and ours


@pytest.fixture(scope="module")
def receiver():
    otlp = OtlpTraceReceiver()
    yield otlp
    otlp.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir, receiver):
    env = {**TRACING_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    with running_server(tiny_model_dir, "--threads", "1", env=env) as process:
        yield process


@pytest.fixture(scope="module")
def calls(server, receiver):
    """Four calls: unsampled root, SDK client span around a stream, sampled and
    unsampled raw traceparent headers. Returns what the test needs to check."""
    client_spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(client_spans))
    tracer = provider.get_tracer("test-client")
    client = QwenClient(server.target)

    unsampled_root = client.chat([{"role": "user", "content": "No trace for me."}], max_tokens=4)
    with tracer.start_as_current_span("client stream") as client_span:
        stream = list(
            client.stream([{"role": "user", "content": "Trace me."}], max_tokens=6, temperature=0.5, top_p=0.9)
        )
    with tracer.start_as_current_span("client invalid") as invalid_span:
        with pytest.raises(grpc.RpcError) as invalid:
            client.chat([{"role": "user", "content": " "}])
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def raw_chat(flags: str) -> tuple[str, str]:
        trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
        metadata = (("traceparent", f"00-{trace_id}-{parent_id}-{flags}"),)
        client._stub.Chat(
            build_request([{"role": "user", "content": "Hi"}], max_tokens=3), metadata=metadata, timeout=30
        )
        return trace_id, parent_id

    not_sampled = raw_chat("00")
    sampled = raw_chat("01")
    client.close()
    stream_trace = format(client_span.get_span_context().trace_id, "032x")
    invalid_trace = format(invalid_span.get_span_context().trace_id, "032x")
    wanted = {stream_trace: 5, invalid_trace: 2, sampled[0]: 5}  # spans per trace
    spans = receiver.wait_for(lambda got: all(sum(s.trace_id == t for s in got) >= n for t, n in wanted.items()))
    return {
        "spans": spans,
        "stream": (stream_trace, format(client_span.get_span_context().span_id, "016x"), stream[-1]),
        "invalid": (invalid_trace, format(invalid_span.get_span_context().span_id, "016x")),
        "raw_sampled": sampled,
        "raw_not_sampled": not_sampled,
        "unsampled_root": unsampled_root,
    }


def _by_name(spans, trace_id: str) -> dict:
    mine = [s for s in spans if s.trace_id == trace_id]
    named = {s.name: s for s in mine}
    assert len(named) == len(mine), [s.name for s in mine]
    return named


def test_stream_span_tree_continues_the_callers_trace(calls):
    trace_id, client_span_id, final = calls["stream"]
    spans = _by_name(calls["spans"], trace_id)
    model = final.model
    assert set(spans) == {"qwen.QwenService/ChatStream", f"chat {model}", "queue", "prefill", "decode"}
    server = spans["qwen.QwenService/ChatStream"]
    chat = spans[f"chat {model}"]
    assert server.parent_span_id == client_span_id  # the client SDK sent traceparent
    assert server.kind == ProtoSpan.SPAN_KIND_SERVER
    assert server.attributes["rpc.system"] == "grpc"
    assert server.attributes["rpc.service"] == "qwen.QwenService"
    assert server.attributes["rpc.method"] == "ChatStream"
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert server.attributes["network.peer.address"] == "127.0.0.1"
    assert server.resource["service.name"] == SERVICE_NAME
    assert server.resource["service.instance.id"]

    assert chat.parent_span_id == server.span_id
    for phase in ("queue", "prefill", "decode"):
        assert spans[phase].parent_span_id == chat.span_id
    a = chat.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == model
    assert a["gen_ai.request.max_tokens"] == 6
    assert a["gen_ai.request.temperature"] == 0.5
    assert a["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert a["gen_ai.usage.input_tokens"] == final.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == final.usage.completion_tokens
    reason = {1: "stop", 2: "length"}[final.finish_reason]
    assert a["gen_ai.response.finish_reasons"] == (reason,)
    assert a["gen_ai.response.id"] == final.id
    assert spans["prefill"].attributes["gen_ai.usage.input_tokens"] == final.usage.prompt_tokens
    assert spans["decode"].attributes["gen_ai.usage.output_tokens"] == final.usage.completion_tokens

    # Nested in time: server > chat > queue | prefill | decode, back to back.
    queue, prefill, decode = spans["queue"], spans["prefill"], spans["decode"]
    assert server.start_ns <= chat.start_ns + TOLERANCE_NS
    assert chat.start_ns <= queue.start_ns <= queue.end_ns == prefill.start_ns
    assert prefill.start_ns <= prefill.end_ns == decode.start_ns <= decode.end_ns <= chat.end_ns
    assert chat.end_ns <= server.end_ns + TOLERANCE_NS


def test_errors_are_traced_with_their_status(calls):
    trace_id, client_span_id = calls["invalid"]
    spans = _by_name(calls["spans"], trace_id)
    server = spans["qwen.QwenService/Chat"]
    (chat,) = [s for name, s in spans.items() if name.startswith("chat")]
    assert server.parent_span_id == client_span_id
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert server.status_code == 0  # a bad request is not a server error (OTel RPC conventions)
    assert chat.parent_span_id == server.span_id
    assert chat.attributes["error.type"] == "validation"


def test_w3c_traceparent_in_metadata_is_honoured(calls):
    trace_id, parent_id = calls["raw_sampled"]
    spans = _by_name(calls["spans"], trace_id)
    assert spans["qwen.QwenService/Chat"].parent_span_id == parent_id
    assert {"queue", "prefill", "decode"} <= set(spans)


def test_sampling_follows_the_configured_sampler(calls):
    """ratio 0 for roots, parent's decision otherwise: the unsampled root call
    and the call whose traceparent said 'not sampled' export nothing, and
    health checks (polled by the harness) are never traced."""
    traced = {s.trace_id for s in calls["spans"]}
    assert traced == {calls["stream"][0], calls["invalid"][0], calls["raw_sampled"][0]}
    assert calls["raw_not_sampled"][0] not in traced
    assert not [s for s in calls["spans"] if "Health" in s.name]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, False),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False),
    ],
)
def test_tracing_is_off_unless_an_exporter_is_configured(env, expected, monkeypatch):
    assert tracing_requested(env) is expected
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    tracing = setup_tracing()
    assert tracing.enabled is expected
    tracing.shutdown()


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
    ],
)
def test_unsupported_exporters_fail_loudly(env, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ObservabilityError):
        setup_tracing()
