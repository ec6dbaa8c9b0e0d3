"""API keys and per-client rate limits on a real server, attacked over gRPC."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from harness import REPO_ROOT, SOURCE_PATH, ServerProcess, health_status

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc

ENV_KEY = "env-key-0123456789abcdef"
FILE_KEY = "file-key-fedcba9876543210"
OTHER_FILE_KEY = "file-key-second-000000000"


# ----- a real server -------------------------------------------------------------
def _bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


HELLO = pb.ChatRequest(messages=[pb.Message(role="user", content="hi")], max_tokens=3)


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir, tmp_path_factory):
    keys = tmp_path_factory.mktemp("secret") / "api-keys"
    keys.write_text(f"{FILE_KEY}\n{OTHER_FILE_KEY}\n")
    server = ServerProcess(
        tiny_model_dir,
        "--api-keys-file",
        str(keys),
        "--rate-limit-per-second",
        "0.5",
        "--rate-limit-burst",
        "4",
        env={"QWEN_API_KEYS": ENV_KEY},
    )
    try:
        server.wait_serving()
        yield server
    finally:
        server.close()


def _calls(stub):
    return {
        "Chat": lambda md: stub.Chat(HELLO, metadata=md, timeout=30),
        "ChatStream": lambda md: list(stub.ChatStream(HELLO, metadata=md, timeout=30)),
        "ListModels": lambda md: stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=30),
        "CountTokens": lambda md: stub.CountTokens(
            pb.CountTokensRequest(messages=HELLO.messages), metadata=md, timeout=30
        ),
    }


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        _bearer("wrong-key-0000000000000"),
        _bearer(FILE_KEY.upper()),
        (("authorization", f"Basic {FILE_KEY}"),),
        (("x-api-key", FILE_KEY),),
    ],
)
def test_every_method_refuses_a_missing_or_wrong_key(keyed_server, metadata):
    with grpc.insecure_channel(keyed_server.target) as channel:
        for name, call in _calls(pb_grpc.QwenServiceStub(channel)).items():
            with pytest.raises(grpc.RpcError) as info:
                call(metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        # Garbage from an unauthenticated client is refused before it is parsed.
        raw = channel.unary_unary("/qwen.QwenService/Chat")
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\xff\xff\xff", metadata=metadata, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_keys_from_file_and_env_are_accepted_and_health_is_public(keyed_server):
    with grpc.insecure_channel(keyed_server.target) as channel:
        stub = pb_grpc.QwenServiceStub(channel)
        for key in (FILE_KEY, OTHER_FILE_KEY, ENV_KEY):
            assert stub.Chat(HELLO, metadata=_bearer(key), timeout=30).is_final
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as info:
            list(reflect.ServerReflectionInfo(iter([ask]), timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        names = list(reflect.ServerReflectionInfo(iter([ask]), metadata=_bearer(FILE_KEY), timeout=5))
        assert "qwen.QwenService" in {s.name for s in names[0].list_services_response.service}
    assert FILE_KEY not in keyed_server.log and ENV_KEY not in keyed_server.log


def test_rate_limit_is_per_api_key(keyed_server):
    with grpc.insecure_channel(keyed_server.target) as channel:
        stub = pb_grpc.QwenServiceStub(channel)
        codes = []
        for _ in range(8):
            try:
                stub.ListModels(pb.ListModelsRequest(), metadata=_bearer(OTHER_FILE_KEY), timeout=30)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                pushback = dict(exc.trailing_metadata())["grpc-retry-pushback-ms"]
                assert 0 < int(pushback) <= 2000
        # The earlier test spent at most a few of this key's 4; at 0.5/s little refills.
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        # Another key (same peer) has its own bucket; health is never limited.
        assert stub.Chat(HELLO, metadata=_bearer(ENV_KEY), timeout=30).is_final
        for _ in range(10):
            assert health_status(keyed_server.target) == health_pb2.HealthCheckResponse.SERVING


def test_private_health_public_reflection(tiny_model_dir):
    server = ServerProcess(
        tiny_model_dir,
        "--no-auth-public-health",
        "--auth-public-reflection",
        env={"QWEN_API_KEYS": ENV_KEY},
        metadata=_bearer(ENV_KEY),
    )
    try:
        server.wait_serving()
        assert health_status(server.target) is None  # refused without a key
        with grpc.insecure_channel(server.target) as channel:
            with pytest.raises(grpc.RpcError) as info:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            assert list(reflect.ServerReflectionInfo(iter([ask]), timeout=5))
    finally:
        server.close()


def test_rate_limit_by_peer_without_keys(tiny_model_dir):
    server = ServerProcess(tiny_model_dir, "--rate-limit-per-second", "0.2", "--rate-limit-burst", "3")
    try:
        server.wait_serving()
        with (
            grpc.insecure_channel(server.target) as first,
            grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) as second,
        ):
            codes = []
            for channel in (first, second, first, second, first):  # two connections, one peer address
                try:
                    pb_grpc.QwenServiceStub(channel).Chat(HELLO, timeout=30)
                    codes.append("ok")
                except grpc.RpcError as exc:
                    codes.append(exc.code())
        assert codes == ["ok", "ok", "ok", grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.RESOURCE_EXHAUSTED]
    finally:
        server.close()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--api-keys-file", "{empty}"], "no key was found"),
        (["--tls-cert-file", "{empty}"], "must be set together"),
        (["--tls-client-ca-file", "{empty}"], "needs tls_cert_file"),
    ],
)
def test_misconfiguration_refuses_to_start(tiny_model_dir, tmp_path, args, message):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    args = [a.format(empty=empty, missing=tmp_path / "missing") for a in args]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "--model",
            str(tiny_model_dir),
            "--grpc-port",
            "0",
            "--host",
            "127.0.0.1",
            *args,
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": SOURCE_PATH, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


# ----- the same keys and limiter over HTTP --------------------------------------------
def _http(server, method: str, path: str, body: bytes | None = None, key: str | None = None):
    """(status, headers, parsed JSON or None) of one HTTP call."""
    import json
    import urllib.error
    import urllib.request

    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(server.http_url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, reply_headers, data = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, reply_headers, data = exc.code, exc.headers, exc.read()
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    return status, reply_headers, parsed


CHAT_BODY = b'{"model": "", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}'


def test_http_api_needs_a_key_health_and_page_do_not(keyed_server):
    for key in (None, "wrong-key-0000000000000", FILE_KEY.upper()):
        for method, path, body in (("POST", "/v1/chat/completions", CHAT_BODY), ("GET", "/v1/models", None)):
            status, headers, error = _http(keyed_server, method, path, body, key)
            assert status == 401, (key, path, status)
            assert error["error"]["code"] == "invalid_api_key" and error["error"]["type"] == "invalid_request_error"
            assert headers["www-authenticate"] == "Bearer"
    status, _, models = _http(keyed_server, "GET", "/v1/models", key=ENV_KEY)
    assert status == 200 and models["data"]
    assert _http(keyed_server, "GET", "/health")[0] == 200
    assert _http(keyed_server, "GET", "/")[0] == 200


def test_one_rate_limit_bucket_per_key_across_grpc_and_http(keyed_server):
    with grpc.insecure_channel(keyed_server.target) as channel:
        stub = pb_grpc.QwenServiceStub(channel)
        for _ in range(10):  # use up FILE_KEY's bucket over gRPC
            try:
                stub.ListModels(pb.ListModelsRequest(), metadata=_bearer(FILE_KEY), timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                break
        else:
            raise AssertionError("the rate limit never applied")
    status, headers, error = _http(keyed_server, "GET", "/v1/models", key=FILE_KEY)
    assert status == 429 and error["error"]["code"] == "rate_limit_exceeded"
    assert int(headers["retry-after"]) >= 1


def test_the_web_page_takes_an_api_key(keyed_server):
    from browser import ask, browser_page

    with browser_page() as page:
        page.goto(keyed_server.http_url + "/")
        page.wait_for_selector("#health.ok", timeout=10_000)
        page.wait_for_function("document.querySelector('#health-text').textContent.includes('API key needed')")
        assert page.locator("#model option").count() == 0  # without a key the API refuses the page
        page.fill("#api-key", OTHER_FILE_KEY)
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.querySelectorAll('#model option').length > 0", timeout=20_000)
        ask(page, "Hello", temperature=0, max_tokens=3)
        page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
        assert "3 tokens" in page.inner_text(".msg.assistant .stats")
