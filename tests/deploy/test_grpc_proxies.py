"""deploy/proxy/nginx-qwen-grpc.conf and haproxy-qwen-grpc.cfg, as shipped,
in front of a real server with Debian's nginx and haproxy: unary and
streaming calls pass unchanged, errors keep their status and details, and a
client's cancel reaches the server (the generation stops and its KV-cache
slot frees). `make test` installs both (the `proxies` target); without one
its tests skip with that reason."""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import socket
import subprocess
import time

import grpc
import pytest
from chart_render import REPO_ROOT
from harness import free_port, running_server

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc

PROXY_DIR = REPO_ROOT / "deploy" / "proxy"


def _binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


NGINX, HAPROXY = _binary("nginx"), _binary("haproxy")
# The two lines of each shipped file a deployment edits; the test points them
# at its own server and port and uses every other line as it is.
NGINX_LISTEN, NGINX_UPSTREAM = "listen 8080 http2;", "server 127.0.0.1:50051;"
HAPROXY_BIND, HAPROXY_SERVER = "bind :8080 proto h2", "server replica1 127.0.0.1:50051 proto h2 check"


def ask(max_tokens: int = 8, **kwargs) -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.Message(role="user", content="Hello")], max_tokens=max_tokens, **kwargs)


def _shipped(name: str, *edits: tuple[str, str]) -> str:
    text = (PROXY_DIR / name).read_text()
    for old, new in edits:
        assert old in text, f"{name} changed ({old!r} is gone): update this test"
        text = text.replace(old, new)
    return text


def _wait_listening(process: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the proxy did not listen"
        time.sleep(0.05)


@contextlib.contextmanager
def haproxy_in_front_of(upstream: str, workdir: pathlib.Path):
    port = free_port()
    config = workdir / "haproxy.cfg"
    config.write_text(
        _shipped(
            "haproxy-qwen-grpc.cfg",
            (HAPROXY_BIND, f"bind 127.0.0.1:{port} proto h2"),
            (HAPROXY_SERVER, f"server replica1 {upstream} proto h2 check"),
        )
    )
    check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    process = subprocess.Popen(
        [HAPROXY, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_listening(process, port)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@contextlib.contextmanager
def nginx_in_front_of(upstream: str, workdir: pathlib.Path):
    port = free_port()
    (workdir / "qwen-grpc.conf").write_text(
        _shipped(
            "nginx-qwen-grpc.conf",
            (NGINX_LISTEN, f"listen 127.0.0.1:{port} http2;"),
            (NGINX_UPSTREAM, f"server {upstream};"),
        )
    )
    temp = {name: workdir / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir()
    (workdir / "nginx.conf").write_text(f"""
daemon off;
master_process on;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {workdir}/access.log;
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {workdir}/qwen-grpc.conf;
}}
""")
    check = subprocess.run(
        [NGINX, "-t", "-p", str(workdir), "-c", str(workdir / "nginx.conf")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    process = subprocess.Popen(
        [NGINX, "-p", str(workdir), "-c", str(workdir / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_listening(process, port)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def single_slot_server(tiny_model_dir):
    """One slot and no queue: a generation that goes on after its client
    cancelled shows at once as RESOURCE_EXHAUSTED for the next call."""
    with running_server(
        tiny_model_dir,
        "--max-batch-size",
        "1",
        "--max-waiting",
        "0",
        "--max-model-len",
        "8192",
        "--max-tokens-limit",
        "8000",
        "--threads",
        "1",
    ) as server:
        yield server


PROXIES = {"nginx": (NGINX, nginx_in_front_of), "haproxy": (HAPROXY, haproxy_in_front_of)}


@pytest.fixture(scope="module", params=list(PROXIES))
def proxied(request, single_slot_server, tmp_path_factory):
    binary, in_front_of = PROXIES[request.param]
    if binary is None:
        pytest.skip(f"{request.param} not installed (`make proxies` installs Debian's)")
    with in_front_of(single_slot_server.target, tmp_path_factory.mktemp(request.param)) as target:
        with grpc.insecure_channel(target) as proxy, grpc.insecure_channel(single_slot_server.target) as direct:
            yield pb_grpc.QwenServiceStub(proxy), pb_grpc.QwenServiceStub(direct)


def test_unary_through_the_proxy_equals_direct(proxied):
    through, direct = proxied
    via_proxy = through.Chat(ask(max_tokens=12, temperature=0), timeout=30)
    straight = direct.Chat(ask(max_tokens=12, temperature=0), timeout=30)
    assert via_proxy.is_final and via_proxy.usage.completion_tokens > 0
    assert (via_proxy.content, via_proxy.usage, via_proxy.finish_reason) == (
        straight.content,
        straight.usage,
        straight.finish_reason,
    )


def test_stream_through_the_proxy_arrives_message_by_message(proxied):
    through, direct = proxied
    streamed = list(through.ChatStream(ask(max_tokens=16, temperature=0), timeout=30))
    assert len(streamed) > 2 and streamed[-1].is_final
    assert [m.index for m in streamed[:-1]] == list(range(len(streamed) - 1))
    expected = "".join(m.content for m in direct.ChatStream(ask(max_tokens=16, temperature=0), timeout=30))
    assert "".join(m.content for m in streamed) == expected


def test_errors_keep_their_status_and_details_through_the_proxy(proxied):
    through, _ = proxied
    with pytest.raises(grpc.RpcError) as error:
        through.Chat(pb.ChatRequest(messages=[]), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("messages:")


def test_a_client_cancel_through_the_proxy_reaches_the_server(proxied):
    through, _ = proxied
    call = through.ChatStream(ask(max_tokens=8000, temperature=0), timeout=120)
    next(call), next(call)
    # The only slot is taken while it generates: refused at once, through the proxy too.
    with pytest.raises(grpc.RpcError) as busy:
        through.Chat(ask(max_tokens=2), timeout=10)
    assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    call.cancel()
    deadline = time.monotonic() + 3.0
    while True:  # 8000 tokens would take far longer: the cancel must have stopped it
        try:
            through.Chat(ask(max_tokens=2), timeout=10)
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert time.monotonic() < deadline, "the generation went on after the client cancelled through the proxy"
            time.sleep(0.05)
