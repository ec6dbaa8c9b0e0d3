"""Server connection management against the real server (tiny model) on
loopback: settings -> channel args, ping enforcement, connection age grace,
client-side health checking and the qwen-replica header."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from fleet_calls import SLOW_READER_CHANNEL_ARGS, SLOW_READER_SERVER_ARGS, SlowStream
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import running_server

from qwen_grpc_client import QwenClient, fleet_channel
from service.api.grpc_server import server_options
from service.config import Settings, load_settings


def test_connection_settings_become_channel_args(monkeypatch):
    monkeypatch.setenv("QWEN_MAX_CONNECTION_AGE_GRACE", "900")
    settings = load_settings(
        ["--max-connection-age", "45", "--keepalive-min-ping-interval", "5", "--no-keepalive-permit-without-calls"]
    )
    options = dict(server_options(settings))
    assert options["grpc.max_connection_age_ms"] == 45_000
    assert options["grpc.max_connection_age_grace_ms"] == 900_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 5_000
    assert options["grpc.keepalive_permit_without_calls"] == 0
    # 0 disables connection age (gRPC's own default: connections live forever).
    assert "grpc.max_connection_age_ms" not in dict(server_options(Settings(max_connection_age=0)))


def test_defaults_accept_the_sdk_keepalive():
    """The SDK pings every 30 s by default, also on idle channels."""
    settings = Settings()
    assert settings.keepalive_permit_without_calls
    assert settings.keepalive_min_ping_interval <= 30
    # Grace must cover the longest stream: max_tokens_limit (2048) at 5 tok/s
    # is about 410 s, a pessimistic rate for a fully batched 2-core replica.
    assert settings.max_connection_age_grace >= settings.max_tokens_limit / 5


def _idle_channel_states(target: str, seconds: float) -> list[grpc.ChannelConnectivity]:
    """Connectivity states of an idle SDK channel pinging every second."""
    states: list[grpc.ChannelConnectivity] = []
    channel = fleet_channel(target, keepalive_seconds=1.0, keepalive_timeout_seconds=2)
    ready = threading.Event()

    def record(state: grpc.ChannelConnectivity) -> None:
        states.append(state)
        if state is grpc.ChannelConnectivity.READY:
            ready.set()

    channel.subscribe(record, try_to_connect=True)
    assert ready.wait(10), f"channel never became ready: {states}"
    time.sleep(seconds)
    channel.unsubscribe(record)
    channel.close()
    return states[states.index(grpc.ChannelConnectivity.READY) :]


def test_server_permits_client_keepalive_pings(tiny_model_dir):
    """With ping enforcement relaxed, an idle channel pinging fast stays
    READY; with gRPC's defaults (5 min, and no pings without calls) the
    server answers GOAWAY too_many_pings and the channel drops."""
    permissive = ("--keepalive-min-ping-interval", "0.25")
    strict = ("--keepalive-min-ping-interval", "300", "--no-keepalive-permit-without-calls")
    observed = {}
    for name, flags in (("permissive", permissive), ("strict", strict)):
        with running_server(tiny_model_dir, "--threads", "1", *flags) as server:
            observed[name] = _idle_channel_states(server.target, 5.0)
    assert observed["permissive"] == [grpc.ChannelConnectivity.READY], observed
    assert any(s is not grpc.ChannelConnectivity.READY for s in observed["strict"]), observed


def test_short_grace_cuts_streams_long_grace_does_not(tiny_model_dir):
    """Why the grace default matters (and that the slow-reader streams used in
    the fleet test really outlive their connection's age)."""
    outcomes = {}
    for grace in ("1", "30"):
        with running_server(
            tiny_model_dir,
            "--threads",
            "1",
            "--max-connection-age",
            "1",
            "--max-connection-age-grace",
            grace,
            *SLOW_READER_SERVER_ARGS,
        ) as server:
            with QwenClient(server.target, timeout=30, extra_options=SLOW_READER_CHANNEL_ARGS) as client:
                stream = SlowStream(client, max_tokens=600)
                stream.start()
                outcomes[grace] = stream.finish()
    cut, kept = outcomes["1"], outcomes["30"]
    assert cut.error is not None and cut.error.code() == grpc.StatusCode.UNAVAILABLE, cut.error
    assert kept.error is None and kept.final is not None and kept.final.is_final
    assert kept.ended - kept.started > 2.5


def test_health_watch_and_replica_header(tiny_model_dir):
    with running_server(tiny_model_dir, "--threads", "1", "--replica-name", "pod-7") as server:
        with grpc.insecure_channel(server.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="qwen.QwenService"), timeout=5
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
        with QwenClient(server.target, timeout=10) as client:
            assert client.chat([{"role": "user", "content": "hi"}], max_tokens=2).replica == "pod-7"
            with client.stream([{"role": "user", "content": "hi"}], max_tokens=2) as stream:
                next(stream)
                assert stream.replica() == "pod-7"


def test_refused_call_is_not_committed(tiny_model_dir):
    """A draining server refuses with UNAVAILABLE before sending any header,
    so the SDK's retry policy may move the call (here: there is no other
    replica, so all attempts are refused and the caller sees UNAVAILABLE)."""
    with running_server(tiny_model_dir, "--threads", "1", "--drain-timeout", "10", *SLOW_READER_SERVER_ARGS) as server:
        with QwenClient(server.target, timeout=10, extra_options=SLOW_READER_CHANNEL_ARGS) as slow:
            stream = SlowStream(slow, max_tokens=600)  # keeps the server draining
            stream.start()
            stream.wait_replica()
            server.process.send_signal(15)
            time.sleep(0.3)
            with QwenClient(server.target, timeout=5, health_check=False) as client:
                with pytest.raises(grpc.RpcError) as refused:
                    client.chat([{"role": "user", "content": "hi"}], max_tokens=2)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert refused.value.initial_metadata() in ((), None, [])
            stream.finish()
            assert stream.error is None
