"""API keys and per-client rate limits: unit tests of the transport-free
parts, then a real server attacked over gRPC."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from harness import REPO_ROOT, ServerProcess, health_status
from service.api.interceptors import peer_host
from service.auth import ApiKeyAuth, fingerprint, read_keys_file
from service.config import Settings, load_settings
from service.errors import RateLimited, Unauthenticated
from service.pb.qwen import qwen_service_pb2 as pb
from service.pb.qwen import qwen_service_pb2_grpc as pb_grpc
from service.ratelimit import RateLimiter

ENV_KEY = "env-key-0123456789abcdef"
FILE_KEY = "file-key-fedcba9876543210"
OTHER_FILE_KEY = "file-key-second-000000000"


# ----- units -------------------------------------------------------------------
def test_keys_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# team A\n{FILE_KEY}\n\n   {OTHER_FILE_KEY}  \n#{ENV_KEY}\n")
    assert read_keys_file(path) == [FILE_KEY, OTHER_FILE_KEY]


def test_keys_from_env_and_file_are_merged(tmp_path, monkeypatch):
    path = tmp_path / "keys"
    path.write_text(FILE_KEY + "\n")
    monkeypatch.setenv("QWEN_API_KEYS", f" {ENV_KEY} ,, other-env-key-0000000")
    settings = load_settings(["--api-keys-file", str(path)])
    assert settings.api_keys == [ENV_KEY, "other-env-key-0000000"]
    assert ENV_KEY not in repr(settings)  # keys stay out of logs and tracebacks
    auth = ApiKeyAuth.from_settings(settings)
    for key in (ENV_KEY, "other-env-key-0000000", FILE_KEY):
        assert auth.authenticate(f"Bearer {key}") == fingerprint(key)


def test_auth_is_off_without_keys_and_fails_closed_with_an_empty_source(tmp_path):
    assert ApiKeyAuth.from_settings(Settings()) is None
    empty = tmp_path / "empty"
    empty.write_text("# no keys yet\n\n")
    with pytest.raises(ValueError, match="no key"):
        ApiKeyAuth.from_settings(Settings(api_keys_file=str(empty)))
    with pytest.raises(FileNotFoundError):
        ApiKeyAuth.from_settings(Settings(api_keys_file=str(tmp_path / "missing")))


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", f"Basic {ENV_KEY}", f"Bearer {ENV_KEY}x", f"Bearer {ENV_KEY[:-1]}", ENV_KEY, "Bearer \x00"],
)
def test_wrong_or_missing_keys_are_refused(header):
    auth = ApiKeyAuth([ENV_KEY, FILE_KEY])
    with pytest.raises(Unauthenticated):
        auth.authenticate(header)


def test_bearer_scheme_is_case_insensitive_and_spaces_are_trimmed():
    auth = ApiKeyAuth([ENV_KEY])
    assert auth.authenticate(f"bearer {ENV_KEY}") == auth.authenticate(f"  Bearer   {ENV_KEY} ")
    assert fingerprint(ENV_KEY).startswith("key-") and ENV_KEY not in fingerprint(ENV_KEY)


def test_token_bucket_refills_at_the_rate_and_reports_the_wait():
    now = [100.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.try_acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.try_acquire("a") == pytest.approx(0.5)
    assert limiter.try_acquire("b") == 0.0  # another client has its own bucket
    now[0] += 0.5
    assert limiter.try_acquire("a") == 0.0
    with pytest.raises(RateLimited) as info:
        limiter.check("a")
    assert info.value.retry_after_seconds == pytest.approx(0.5)
    now[0] += 100
    assert [limiter.try_acquire("a") for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.5)]  # capped at burst


def test_token_bucket_memory_is_bounded():
    limiter = RateLimiter(rate=1.0, burst=1, max_clients=100)
    for i in range(10_000):
        limiter.try_acquire(f"client-{i}")
    assert len(limiter) == 100


@pytest.mark.parametrize(
    "peer, host",
    [
        ("ipv4:127.0.0.1:51234", "ipv4:127.0.0.1"),
        ("ipv6:[::1]:51234", "ipv6:[::1]"),
        ("ipv6:[2001:db8::7]:443", "ipv6:[2001:db8::7]"),
        ("unix:/tmp/sock", "unix:/tmp/sock"),
    ],
)
def test_peer_host_drops_the_port(peer, host):
    assert peer_host(peer) == host


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
        "--api-keys-file", str(keys),
        "--rate-limit-per-second", "0.5",
        "--rate-limit-burst", "4",
        env={"QWEN_API_KEYS": ENV_KEY},
    )  # fmt: skip
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
        "CountTokens": lambda md: stub.CountTokens(pb.CountTokensRequest(messages=HELLO.messages), metadata=md, timeout=30),
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
        with grpc.insecure_channel(server.target) as first, grpc.insecure_channel(
            server.target, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as second:
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
        [sys.executable, "-m", "service.cli", "--model", str(tiny_model_dir), "--grpc-port", "0", "--host", "127.0.0.1", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
