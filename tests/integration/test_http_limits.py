"""The HTTP listener under connection floods, with real sockets against a real
server: silent connections, slowloris headers, stalled and abandoned bodies,
more connections than the cap, and the allowed-hosts check. Meanwhile /health
and gRPC stay fast."""

from __future__ import annotations

import http.client
import pathlib
import resource
import select
import socket
import time

import pytest
from grpc_health.v1 import health_pb2
from harness import ServerProcess, health_status, running_server

HEADER_TIMEOUT, BODY_TIMEOUT, MAX_CONNECTIONS = 1.5, 2.0, 40
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def flood_server(tiny_model_dir):
    args = (
        "--threads",
        "1",
        "--http-header-timeout",
        str(HEADER_TIMEOUT),
        "--http-body-timeout",
        str(BODY_TIMEOUT),
        "--http-max-connections",
        str(MAX_CONNECTIONS),
        "--allowed-hosts",
        "localhost,127.0.0.1,*.example.test",
    )
    with running_server(tiny_model_dir, *args) as server:
        yield server


def _connect(server) -> socket.socket:
    return socket.create_connection((server.host, server.http_port), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed `sock` (EOF or reset), or None if it is still open after `seconds`."""
    started = time.monotonic()
    readable, _, _ = select.select([sock], [], [], seconds)
    if not readable:
        return None
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return time.monotonic() - started
    return time.monotonic() - started if data == b"" else None


def _health_seconds(server) -> float:
    started = time.monotonic()
    connection = http.client.HTTPConnection(server.host, server.http_port, timeout=10)
    connection.request("GET", "/health", headers={"Host": "localhost"})
    assert connection.getresponse().status == 200
    connection.close()
    return time.monotonic() - started


def _grpc_health_seconds(server) -> float:
    started = time.monotonic()
    assert health_status(server.target, timeout=5) == SERVING
    return time.monotonic() - started


def test_silent_connections_are_closed_after_the_header_timeout(flood_server):
    silent = [_connect(flood_server) for _ in range(MAX_CONNECTIONS - 5)]
    try:
        # While they sit there, the API and gRPC answer at once.
        assert _health_seconds(flood_server) < 1.0
        assert _grpc_health_seconds(flood_server) < 1.0
        waited = [_closed_within(sock, HEADER_TIMEOUT + 3) for sock in silent]
        assert all(w is not None for w in waited), waited
    finally:
        for sock in silent:
            sock.close()


def test_slowloris_headers_are_cut_off(flood_server):
    sock = _connect(flood_server)
    started = time.monotonic()
    request = b"GET /health HTTP/1.1\r\nHost: localhost\r\n" + b"X-Slow: " + b"a" * 1000
    try:
        for byte in request:  # one byte every 50 ms: never a complete header block
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            if _closed_within(sock, 0.05) is not None:
                break
            assert time.monotonic() - started < HEADER_TIMEOUT + 3, "slowloris connection still open"
        assert HEADER_TIMEOUT - 0.1 <= time.monotonic() - started < HEADER_TIMEOUT + 3
    finally:
        sock.close()


def test_a_stalled_body_is_cut_off_and_abandoned_bodies_log_nothing(flood_server):
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"messages": ['
    )
    stalled = _connect(flood_server)
    stalled.sendall(head)
    waited = _closed_within(stalled, BODY_TIMEOUT + 3)
    stalled.close()
    assert waited is not None and waited >= BODY_TIMEOUT - 0.5, waited
    for _ in range(20):  # clients that go away mid-body
        sock = _connect(flood_server)
        sock.sendall(head)
        sock.close()
    assert _health_seconds(flood_server) < 1.0
    time.sleep(0.5)  # let the server notice the last disconnects
    log = flood_server.log
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_connections_beyond_the_cap_are_closed_at_once(flood_server):
    held = [_connect(flood_server) for _ in range(MAX_CONNECTIONS)]
    extra = [_connect(flood_server) for _ in range(10)]
    try:
        closed_at_once = [_closed_within(sock, 0.5) for sock in extra]
        assert all(w is not None for w in closed_at_once), closed_at_once
        assert _grpc_health_seconds(flood_server) < 1.0  # gRPC keeps working meanwhile
    finally:
        for sock in held + extra:
            sock.close()
    time.sleep(0.3)  # the server sees the closes
    assert _health_seconds(flood_server) < 1.0


@pytest.mark.parametrize(
    "host, status",
    [
        ("localhost", 200),
        ("127.0.0.1:8000", 200),
        ("api.example.test", 200),
        ("evil.example", 400),
        ("example.test", 400),
        ("localhost.evil.example", 400),
    ],
)
def test_only_allowed_hosts_are_served(flood_server, host, status):
    connection = http.client.HTTPConnection(flood_server.host, flood_server.http_port, timeout=10)
    connection.request("GET", "/v1/models", headers={"Host": host})
    response = connection.getresponse()
    body = response.read()
    assert response.status == status, body
    if status == 400:
        assert b"invalid_host" in body
    connection.request("GET", "/health", headers={"Host": host})  # probes use the pod IP: always answered
    assert connection.getresponse().status == 200
    connection.close()


def test_the_file_descriptor_limit_is_raised_to_the_hard_limit(tiny_model_dir):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 256)
    if low == hard:
        pytest.skip("the hard file-descriptor limit is already this low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))  # inherited by the server process
    try:
        server = ServerProcess(tiny_model_dir, "--threads", "1")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        server.wait_serving()
        limits = pathlib.Path(f"/proc/{server.process.pid}/limits").read_text()
        line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)], line
    finally:
        server.close()
