"""A private replica fleet on this machine: each replica of the real server in
its own network namespace on a private bridge, behind a real DNS server
(dnsmasq) that answers a headless-Service name with one A record per ready
replica, like Kubernetes cluster DNS.

Safety: the test subnet gets an `unreachable` route, so if the bridge is gone
nothing addressed to it leaves the machine; namespaces have no default route;
dnsmasq has no upstream and answers only cluster.local. Everything is torn
down in close(), which also removes leftovers of an earlier crashed run.
Needs root (ip netns) and Debian's dnsmasq-base.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import grpc
from grpc_health.v1 import health_pb2
from harness import REPO_ROOT, SOURCE_PATH, health_status, terminate_process

SUBNET_PREFIX = "10.213.47"  # private /24 used only by this test
SUBNET = f"{SUBNET_PREFIX}.0/24"
BRIDGE = "qwfleet0"
BRIDGE_IP = f"{SUBNET_PREFIX}.1"
NETNS_PREFIX = "qwfleet-"
VETH_PREFIX = "qwf-"  # host side; interface names are limited to 15 characters
SERVICE_NAME = "qwen-headless.default.svc.cluster.local"
GRPC_PORT = 50051
LOCK_PATH = "/run/qwen-grpc-fleet-test.lock"  # one fleet per machine: the names above are fixed


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


def missing_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "dnsmasq"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (make test-lb installs dnsmasq-base)"
    return None


def free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def dns_query_a(server: str, port: int, name: str, timeout: float = 2.0) -> tuple[int, list[str]]:
    """One A query over UDP: (rcode, addresses). Enough DNS to check what the
    test's resolver answers without a DNS library."""
    query_id = os.getpid() & 0xFFFF
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (server, port))
        reply, _ = sock.recvfrom(4096)
    _, flags, qdcount, ancount, _, _ = struct.unpack(">HHHHHH", reply[:12])
    offset = 12
    for _ in range(qdcount):  # skip the echoed question
        while reply[offset] != 0:
            offset += reply[offset] + 1
        offset += 5
    addresses = []
    for _ in range(ancount):
        if reply[offset] & 0xC0 == 0xC0:  # compressed name pointer
            offset += 2
        else:
            while reply[offset] != 0:
                offset += reply[offset] + 1
            offset += 1
        rtype, _, _, length = struct.unpack(">HHIH", reply[offset : offset + 10])
        offset += 10
        if rtype == 1 and length == 4:
            addresses.append(socket.inet_ntoa(reply[offset : offset + 4]))
        offset += length
    return flags & 0x000F, addresses


class Replica:
    def __init__(self, name: str, index: int) -> None:
        self.name = name
        self.netns = f"{NETNS_PREFIX}{name}"
        self.veth = f"{VETH_PREFIX}{name}"
        self.ip = f"{SUBNET_PREFIX}.{10 + index}"
        self.target = f"{self.ip}:{GRPC_PORT}"
        self.process: subprocess.Popen | None = None
        self.log_path: pathlib.Path | None = None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Fleet:
    """Replicas r1, r2, ... at 10.213.47.11, .12, ... port 50051, and a DNS
    server on 127.0.0.1:<dns_port> (and the bridge address)."""

    def __init__(self, model_dir: pathlib.Path, server_args: list[str]) -> None:
        self.model_dir = model_dir
        self.server_args = server_args
        self.replicas: dict[str, Replica] = {}
        self.in_dns: set[str] = set()
        self.dns_port = free_udp_port()
        self.target = f"dns://127.0.0.1:{self.dns_port}/{SERVICE_NAME}:{GRPC_PORT}"
        self._lock = open(LOCK_PATH, "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        # dnsmasq drops root: its hosts file and folder must be world-readable
        # (a mkdtemp folder is 0700).
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="qwen-fleet-"))
        self.workdir.chmod(0o755)
        self.hosts_file = self.workdir / "hosts"
        self.dnsmasq: subprocess.Popen | None = None

    # ----- network ---------------------------------------------------------
    def setup(self) -> None:
        self.remove_leftovers()
        # The safety net first: with the bridge gone, the subnet is unreachable
        # instead of routed to the default gateway.
        run("ip", "route", "add", "unreachable", SUBNET, "metric", "4000")
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        self.write_hosts()
        self.dnsmasq = subprocess.Popen(
            [
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                f"--addn-hosts={self.hosts_file}",
                "--bind-interfaces",
                f"--listen-address=127.0.0.1,{BRIDGE_IP}",
                f"--port={self.dns_port}",
                "--local=/cluster.local/",
                "--local-ttl=0",
                f"--pid-file={self.workdir / 'dnsmasq.pid'}",
                "--log-facility=-",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "dnsmasq.log", "w"),
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                dns_query_a("127.0.0.1", self.dns_port, SERVICE_NAME, timeout=0.5)
                break
            except OSError as exc:
                if self.dnsmasq.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("dnsmasq did not start: " + (self.workdir / "dnsmasq.log").read_text()) from exc
                time.sleep(0.1)

    def _add_namespace(self, replica: Replica) -> None:
        run("ip", "netns", "add", replica.netns)
        run("ip", "link", "add", replica.veth, "type", "veth", "peer", "name", "eth0", "netns", replica.netns)
        run("ip", "link", "set", replica.veth, "master", BRIDGE)
        run("ip", "link", "set", replica.veth, "up")
        in_ns = ("ip", "netns", "exec", replica.netns)
        run(*in_ns, "ip", "link", "set", "lo", "up")
        run(*in_ns, "ip", "addr", "add", f"{replica.ip}/24", "dev", "eth0")
        run(*in_ns, "ip", "link", "set", "eth0", "up")

    def cut_link(self, name: str) -> None:
        """Blackhole: packets to and from the replica vanish; nobody sends RST."""
        run("ip", "link", "set", self.replicas[name].veth, "down")

    def restore_link(self, name: str) -> None:
        run("ip", "link", "set", self.replicas[name].veth, "up")

    # ----- DNS -------------------------------------------------------------
    def write_hosts(self) -> None:
        lines = [f"{self.replicas[n].ip} {SERVICE_NAME}\n" for n in sorted(self.in_dns)]
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        tmp.chmod(0o644)
        tmp.replace(self.hosts_file)
        if self.dnsmasq is not None and self.dnsmasq.poll() is None:
            self.dnsmasq.send_signal(signal.SIGHUP)  # re-read the hosts file
            expected = sorted(self.replicas[n].ip for n in self.in_dns)
            deadline = time.monotonic() + 5
            while sorted(dns_query_a("127.0.0.1", self.dns_port, SERVICE_NAME)[1]) != expected:
                if time.monotonic() > deadline:
                    raise RuntimeError("dnsmasq did not pick up the new hosts file")
                time.sleep(0.05)

    def publish(self, name: str) -> None:
        """Add the replica's A record, as Kubernetes does once a pod is ready."""
        self.in_dns.add(name)
        self.write_hosts()

    def unpublish(self, name: str) -> None:
        self.in_dns.discard(name)
        self.write_hosts()

    # ----- replicas --------------------------------------------------------
    def start(self, name: str, *extra_args: str) -> Replica:
        """Start (or restart) a replica process in its namespace; not yet in DNS."""
        replica = self.replicas.get(name)
        if replica is None:
            replica = Replica(name, len(self.replicas) + 1)
            self.replicas[name] = replica
            self._add_namespace(replica)
        assert not replica.alive(), f"{name} is already running"
        replica.log_path = self.workdir / f"{name}.log"
        argv = [
            "ip",
            "netns",
            "exec",
            replica.netns,
            sys.executable,
            "-m",
            "service.cli",
            "--model",
            str(self.model_dir),
            "--host",
            replica.ip,
            "--grpc-port",
            str(GRPC_PORT),
            "--replica-name",
            name,
            *self.server_args,
            *extra_args,
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": SOURCE_PATH}
        with open(replica.log_path, "a") as log:
            replica.process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        return replica

    def wait_serving(self, name: str, timeout: float = 60.0) -> None:
        replica = self.replicas[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not replica.alive():
                raise RuntimeError(f"{name} exited with {replica.process.returncode}:\n{replica.log}")
            if health_status(replica.target, timeout=0.5) == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{name} not SERVING after {timeout} s:\n{replica.log}")

    def signal(self, name: str, signum: int) -> None:
        self.replicas[name].process.send_signal(signum)

    def stop(self, name: str, timeout: float = 30.0) -> int:
        replica = self.replicas[name]
        if replica.process is None:
            return 0
        return terminate_process(replica.process, timeout)

    # ----- teardown --------------------------------------------------------
    def remove_leftovers(self) -> None:
        """Our own names only: namespaces qwfleet-*, bridge qwfleet0, the route."""
        listed = run("ip", "netns", "list", check=False).stdout.split()
        for netns in (name for name in listed if name.startswith(NETNS_PREFIX)):
            # Processes still inside (from a crashed run) would keep it alive.
            pids = run("ip", "netns", "pids", netns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "delete", netns, check=False)
        run("ip", "link", "delete", BRIDGE, check=False)
        run("ip", "route", "delete", "unreachable", SUBNET, check=False)

    def close(self) -> None:
        try:
            for replica in self.replicas.values():
                if replica.process is not None and replica.process.poll() is None:
                    replica.process.kill()
                    replica.process.wait(10)
            if self.dnsmasq is not None and self.dnsmasq.poll() is None:
                self.dnsmasq.terminate()
                try:
                    self.dnsmasq.wait(5)
                except subprocess.TimeoutExpired:
                    self.dnsmasq.kill()
            self.remove_leftovers()
            shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


def is_unavailable(error: BaseException) -> bool:
    return isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAVAILABLE
