"""Run the real server as a subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from types import ModuleType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# PYTHONPATH for subprocesses: this tree's server and client packages, ahead
# of whatever the venv has installed.
SOURCE_PATH = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "clients" / "python")])


def load_script(path: pathlib.Path) -> ModuleType:
    """A repository script (not part of an importable package) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def open_channel(target: str, credentials: grpc.ChannelCredentials | None = None, **kwargs) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(target, **kwargs)
    return grpc.secure_channel(target, credentials, **kwargs)


def terminate_process(process: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM (the server drains), SIGKILL if it is still there after `timeout`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def health_status(
    target: str,
    service: str = "",
    timeout: float = 1.0,
    credentials: grpc.ChannelCredentials | None = None,
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> int | None:
    """The health status, or None if the server does not answer."""
    with open_channel(target, credentials) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=metadata
            )
        except grpc.RpcError:
            return None
        return reply.status


class ServerProcess:
    """`python -m service.cli` with the given flags; logs go to a file that
    tests (and failure messages) can read."""

    def __init__(
        self,
        model: str | os.PathLike,
        *args: str,
        host: str = "127.0.0.1",
        env: dict | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> None:
        """credentials / metadata: what the health checks of wait_serving send
        (for servers with TLS, or with API keys and a private health service)."""
        self.host = host
        self.credentials = credentials
        self.metadata = metadata
        self.grpc_port = free_port(host)
        self.target = f"{host}:{self.grpc_port}"
        # Never the default 9090: parallel servers (and other test runs) would collide.
        self.metrics_port = 0 if "--metrics-port" in args else free_port(host)
        # HTTP is on by default in qwen-serve: every test server gets its own
        # free port (never the shared default 8000) unless it passes --no-http.
        self.http_port: int | None = None if "--no-http" in args else free_port(host)
        http_args = () if self.http_port is None else ("--http-port", str(self.http_port))
        self._log = tempfile.NamedTemporaryFile(prefix="qwen-serve-", suffix=".log", delete=False)
        self.argv = [
            sys.executable,
            "-m",
            "service.cli",
            "--model",
            str(model),
            "--host",
            host,
            "--grpc-port",
            str(self.grpc_port),
            *(("--metrics-port", str(self.metrics_port)) if self.metrics_port else ()),
            *http_args,
            *args,
        ]
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": SOURCE_PATH, **(env or {})}
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            self.argv, cwd=REPO_ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP API, e.g. http://127.0.0.1:PORT."""
        if self.http_port is None:
            raise RuntimeError("this server runs with --no-http")
        return f"http://{self.host}:{self.http_port}"

    @property
    def log(self) -> str:
        return pathlib.Path(self._log.name).read_text(errors="replace")

    def wait_serving(self, timeout: float = 60.0) -> float:
        """Block until health says SERVING; returns seconds since launch."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log}")
            status = health_status(self.target, timeout=0.5, credentials=self.credentials, metadata=self.metadata)
            if status == health_pb2.HealthCheckResponse.SERVING:
                return time.monotonic() - self.started_at
            time.sleep(0.05)
        raise TimeoutError(f"server not SERVING after {timeout} s:\n{self.log}")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (all threads)."""
        fields = pathlib.Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def wait_port_open(self, timeout: float = 60.0) -> None:
        """Poll TCP until the gRPC port accepts: a gRPC channel created before
        that would sit in reconnect backoff and miss the first seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log}")
            with socket.socket() as sock:
                if sock.connect_ex((self.host, self.grpc_port)) == 0:
                    return
            time.sleep(0.005)
        raise TimeoutError(f"gRPC port not open after {timeout} s:\n{self.log}")

    def terminate(self, timeout: float = 60.0) -> int:
        return terminate_process(self.process, timeout)

    def close(self) -> None:
        self.terminate()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)


@contextlib.contextmanager
def running_server(model: str | os.PathLike, *args: str, timeout: float = 60.0, **kwargs) -> Iterator[ServerProcess]:
    server = ServerProcess(model, *args, **kwargs)
    try:
        server.wait_serving(timeout)
        yield server
    finally:
        server.close()
