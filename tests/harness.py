"""Run the real server as a subprocess. Its gRPC and HTTP listeners bind
port 0 (the kernel picks free ones, no race with other processes) and the
server reports what it bound in its --port-file."""

from __future__ import annotations

import contextlib
import importlib.util
import json
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
# Server flags for one running request at most and no queue (a second call is
# refused while the first holds the slot), with room for answers long enough
# to still be running when a test acts.
ONE_SLOT_ARGS = (
    "--max-batch-size",
    "1",
    "--max-waiting",
    "0",
    "--max-model-len",
    "32768",
    "--max-tokens-limit",
    "30000",
)


def load_script(path: pathlib.Path) -> ModuleType:
    """A repository script (not part of an importable package) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now (another process may take it before it is used): only
    for listeners that cannot bind port 0 themselves."""
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
        self._log = tempfile.NamedTemporaryFile(prefix="qwen-serve-", suffix=".log", delete=False)
        self._port_file = pathlib.Path(self._log.name).with_suffix(".ports.json")
        self._ports: dict[str, int | None] | None = None
        # Never the defaults (50051, 8000, 9090): parallel servers (and other
        # test runs) would collide. --metrics-port 0 turns metrics off, so
        # metrics alone get a port picked here. Flags in `args` come last and win.
        metrics = () if "--metrics-port" in args else ("--metrics-port", str(free_port(host)))
        self.argv = [
            sys.executable,
            "-m",
            "service.cli",
            "--model",
            str(model),
            "--host",
            host,
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            *metrics,
            "--port-file",
            str(self._port_file),
            *args,
        ]
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": SOURCE_PATH, **(env or {})}
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            self.argv, cwd=REPO_ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def _bound_ports(self, timeout: float = 60.0) -> dict[str, int | None]:
        """The ports the server bound, from its --port-file, written once every
        listener is bound (before the model loads)."""
        deadline = time.monotonic() + timeout
        while self._ports is None:
            if self._port_file.exists():
                self._ports = json.loads(self._port_file.read_text())
            elif self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log}")
            elif time.monotonic() > deadline:
                raise TimeoutError(f"no port file after {timeout} s:\n{self.log}")
            else:
                time.sleep(0.01)
        return self._ports

    @property
    def grpc_port(self) -> int:
        port = self._bound_ports()["grpc"]
        assert port is not None
        return port

    @property
    def target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_port(self) -> int | None:
        """None with --no-http."""
        return self._bound_ports()["http"]

    @property
    def metrics_port(self) -> int | None:
        """None with --metrics-port 0."""
        return self._bound_ports()["metrics"]

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
        """Until the gRPC port accepts connections (a gRPC channel created
        before that would sit in reconnect backoff and miss the first
        seconds): the server writes its port file once it listens."""
        self._bound_ports(timeout)

    def terminate(self, timeout: float = 60.0) -> int:
        return terminate_process(self.process, timeout)

    def close(self) -> None:
        self.terminate()
        for path in (self._log.name, self._port_file):
            with contextlib.suppress(OSError):
                os.unlink(path)


@contextlib.contextmanager
def running_server(model: str | os.PathLike, *args: str, timeout: float = 60.0, **kwargs) -> Iterator[ServerProcess]:
    server = ServerProcess(model, *args, **kwargs)
    try:
        server.wait_serving(timeout)
        yield server
    finally:
        server.close()
