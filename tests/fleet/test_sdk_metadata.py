"""What the Python SDK puts on the wire: API key, W3C traceparent, TLS and
client certificates. The server side of API keys and TLS is not part of
qwen-serve yet, so a small grpc.aio server in the test records what arrives
(it answers with a fixed ChatResponse; only the request side is checked)."""

from __future__ import annotations

import asyncio
import pathlib
import subprocess
import sys

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from harness import REPO_ROOT, SOURCE_PATH

from qwen_grpc_client import SESSION_METADATA_KEY, AsyncQwenClient, QwenClient, connect, connect_async
from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc

PROMPT = [{"role": "user", "content": "hi"}]


class RecordingServicer(pb_grpc.QwenServiceServicer):
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.peer_common_names: list[list[bytes]] = []

    def _record(self, context: aio.ServicerContext) -> None:
        self.metadata.append({key: value for key, value in context.invocation_metadata()})
        self.peer_common_names.append(list(context.auth_context().get("x509_common_name", [])))

    async def Chat(self, request, context):
        self._record(context)
        return pb.ChatResponse(id="x", content="ok", is_final=True, finish_reason=pb.FINISH_REASON_STOP)

    async def ChatStream(self, request, context):
        self._record(context)
        for index, piece in enumerate(("o", "k")):
            yield pb.ChatResponse(id="x", content=piece, index=index)
        yield pb.ChatResponse(id="x", index=2, is_final=True, finish_reason=pb.FINISH_REASON_STOP)


class RecordingServer:
    def __init__(self, credentials: grpc.ServerCredentials | None = None) -> None:
        self.credentials = credentials
        self.servicer = RecordingServicer()
        self.server = aio.server()
        pb_grpc.add_QwenServiceServicer_to_server(self.servicer, self.server)
        # The SDK's client-side health checking routes only to replicas that
        # report qwen.QwenService SERVING (see start()).
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = "127.0.0.1:0"
        self.port = (
            self.server.add_secure_port(address, credentials) if credentials else self.server.add_insecure_port(address)
        )
        self.target = f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        await self.health.set("qwen.QwenService", health_pb2.HealthCheckResponse.SERVING)
        await self.server.start()


@pytest.fixture
async def recorder():
    server = RecordingServer()
    await server.start()
    yield server
    await server.server.stop(None)


async def in_thread(function, *args, **kwargs):
    """Blocking SDK calls run off the event loop that serves them."""
    return await asyncio.to_thread(function, *args, **kwargs)


def _sync_calls(target: str, **options) -> list[str]:
    with QwenClient(target, timeout=5, **options) as client:
        unary = client.chat(PROMPT).content
        streamed = "".join(m.content for m in client.stream(PROMPT))
    return [unary, streamed]


async def test_api_key_reaches_the_server_on_every_call_kind(recorder):
    assert await in_thread(_sync_calls, recorder.target, api_key="sk-sync") == ["ok", "ok"]
    async with AsyncQwenClient(recorder.target, timeout=5, api_key="sk-async") as client:
        assert (await client.chat(PROMPT)).content == "ok"
        assert "".join([m.content async for m in client.stream(PROMPT)]) == "ok"

    def raw_stub_call() -> None:  # connect() for users of the generated stubs
        with connect(recorder.target, api_key="sk-raw") as channel:
            pb_grpc.QwenServiceStub(channel).Chat(pb.ChatRequest(), timeout=5)

    await in_thread(raw_stub_call)
    async with connect_async(recorder.target, api_key="sk-raw-async") as channel:
        await pb_grpc.QwenServiceStub(channel).ChatStream(pb.ChatRequest(), timeout=5).read()

    keys = [m.get("authorization") for m in recorder.servicer.metadata]
    assert keys == ["Bearer sk-sync"] * 2 + ["Bearer sk-async"] * 2 + ["Bearer sk-raw", "Bearer sk-raw-async"]


async def test_no_api_key_sends_no_authorization(recorder):
    await in_thread(_sync_calls, recorder.target)
    assert all("authorization" not in m for m in recorder.servicer.metadata)


async def test_traceparent_of_the_current_span_is_propagated(recorder):
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")

    def calls_inside_span() -> tuple[str, str]:
        with tracer.start_as_current_span("edge-request") as span:
            _sync_calls(recorder.target)
            context = span.get_span_context()
            return format(context.trace_id, "032x"), format(context.trace_flags, "02x")

    trace_id, trace_flags = await in_thread(calls_inside_span)
    with tracer.start_as_current_span("async-request") as span:
        async with AsyncQwenClient(recorder.target, timeout=5) as client:
            await client.chat(PROMPT)
        async_span_id = format(span.get_span_context().span_id, "016x")
    await in_thread(_sync_calls, recorder.target)  # no span: no traceparent

    parents = [m.get("traceparent") for m in recorder.servicer.metadata]
    assert len(parents) == 5
    for parent in parents[:2]:
        version, trace, _span, flags = parent.split("-")
        assert (version, trace, flags) == ("00", trace_id, trace_flags)
    assert parents[2].split("-")[2] == async_span_id
    assert parents[3:] == [None, None]


async def test_session_id_travels_as_a_header_only_when_given(recorder):
    def sync_calls() -> None:
        with QwenClient(recorder.target, timeout=5) as client:
            client.chat(PROMPT, session_id="conv-sync")
            assert "".join(m.content for m in client.stream(PROMPT, session_id="conv-sync")) == "ok"
            client.chat(PROMPT)

    await in_thread(sync_calls)
    async with AsyncQwenClient(recorder.target, timeout=5, api_key="sk") as client:
        await client.chat(PROMPT, session_id="conv-async")
        assert "".join([m.content async for m in client.stream(PROMPT, session_id="conv-async")]) == "ok"
        await client.chat(PROMPT)
    sessions = [m.get(SESSION_METADATA_KEY) for m in recorder.servicer.metadata]
    assert sessions == ["conv-sync", "conv-sync", None, "conv-async", "conv-async", None]
    # The channel's interceptors still add the API key to calls with a session.
    assert [m.get("authorization") for m in recorder.servicer.metadata[3:]] == ["Bearer sk"] * 3


@pytest.mark.parametrize("session_id", ["", "caf\u00e9", "line\nbreak", 42])
def test_unusable_session_id_is_refused_before_sending(session_id):
    with QwenClient("localhost:1", timeout=1) as client:
        with pytest.raises(ValueError, match="session_id"):
            client.chat(PROMPT, session_id=session_id)


async def test_sdk_enables_the_request_hash_header_itself(recorder):
    """grpcio honours ring_hash's requestHashHeader only with an environment
    variable set; the SDK sets it, so a process that never heard of it works.
    The same service config on a plain channel, before the SDK built one,
    fails: the variable is what makes the difference."""
    script = (
        "import json, sys, grpc\n"
        "from qwen_grpc_client import QwenClient, service_config\n"
        "from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb, qwen_service_pb2_grpc as pb_grpc\n"
        "config = json.dumps(service_config(affinity=True, health_check=False))\n"
        "with grpc.insecure_channel(sys.argv[1], options=[('grpc.service_config', config)]) as raw:\n"
        "    try:\n"
        "        pb_grpc.QwenServiceStub(raw).Chat(pb.ChatRequest(), metadata=[('qwen-session-id', 'k')], timeout=5)\n"
        "        print('plain channel: OK')\n"
        "    except grpc.RpcError as error:\n"
        "        print('plain channel:', error.code().name, error.details())\n"
        "with QwenClient(sys.argv[1], timeout=5) as client:\n"
        "    print('sdk:', client.chat([('user', 'hi')], session_id='k').content)\n"
    )
    env = {"PYTHONPATH": SOURCE_PATH, "PATH": "/usr/bin:/bin"}  # no GRPC_* variable
    result = await in_thread(
        subprocess.run,
        [sys.executable, "-c", script, recorder.target],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.stdout.splitlines() == ["plain channel: INTERNAL hash attribute not present", "sdk: ok"], (
        result.stderr
    )


def test_sdk_works_without_opentelemetry():
    """OpenTelemetry is optional: with the package hidden the SDK imports and
    sends no traceparent."""
    script = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from qwen_grpc_client.tracing import traceparent_metadata\n"
        "from qwen_grpc_client import QwenClient\n"
        "assert traceparent_metadata() == []\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": SOURCE_PATH, "PATH": "/usr/bin:/bin"},
    )
    assert result.stdout.strip() == "ok", result.stderr


# ----- TLS ----------------------------------------------------------------
def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> pathlib.Path:
    """A CA, a server certificate for localhost/127.0.0.1 and a client
    certificate, made with the openssl command line."""
    folder = tmp_path_factory.mktemp("pki")
    for name in ("ca", "other-ca"):
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.pem",
            cwd=folder,
        )
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN=qwen-{name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=folder,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.pem",
            *ext,
            cwd=folder,
        )
    return folder


@pytest.fixture
async def mtls_recorder(pki):
    credentials = grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    server = RecordingServer(credentials)
    await server.start()
    yield server
    await server.server.stop(None)


async def test_mutual_tls_with_api_key(mtls_recorder, pki):
    options = dict(
        api_key="sk-tls",
        root_certificates=pki / "ca.pem",  # a path; PEM bytes work as well
        client_certificate_chain=(pki / "client.pem").read_bytes(),
        client_private_key=pki / "client.key",
    )
    assert await in_thread(_sync_calls, mtls_recorder.target, **options) == ["ok", "ok"]
    async with AsyncQwenClient(mtls_recorder.target, timeout=5, **options) as client:
        assert (await client.chat(PROMPT)).content == "ok"
    assert [m["authorization"] for m in mtls_recorder.servicer.metadata] == ["Bearer sk-tls"] * 3
    assert mtls_recorder.servicer.peer_common_names == [[b"qwen-client"]] * 3


async def test_tls_refuses_an_untrusted_server_and_missing_client_cert(mtls_recorder, pki):
    untrusted = dict(
        root_certificates=pki / "other-ca.pem",
        client_certificate_chain=pki / "client.pem",
        client_private_key=pki / "client.key",
    )
    no_client_cert = dict(tls=True, root_certificates=pki / "ca.pem")
    for options in (untrusted, no_client_cert):
        with pytest.raises(grpc.RpcError) as failure:
            await in_thread(_sync_calls, mtls_recorder.target, **options)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mtls_recorder.servicer.metadata == []


def test_client_certificate_needs_its_key():
    with pytest.raises(ValueError):
        QwenClient("localhost:1", client_certificate_chain=b"x")
