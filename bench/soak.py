"""Soak: mixed load with random cancels, deadlines and disconnects against a
real `qwen-serve` process, then checks that nothing leaked.

    python bench/soak.py --duration 600                 # the real model (make soak)
    python bench/soak.py --duration 60 --tiny           # a tiny random model (CI)

Each worker loops over random actions: a stream read to the end, a unary
call, a stream cancelled after a few messages, a call with a short deadline,
a stream whose channel is closed mid-way (a disconnect), a client process
killed with SIGKILL mid-stream, an invalid request, CountTokens/ListModels.
Every outcome is checked against what that action may legitimately get (e.g.
RESOURCE_EXHAUSTED when the server is full); anything else is an unexpected
error.

Attackers run alongside (--no-attackers to leave them out): a slowloris
sending its headers a byte at a time, batches of silent HTTP connections,
~1 MB prompts over gRPC, and clients that start a long stream and do not read
it (one over gRPC, one over HTTP). Each must be cut off by the server's own
bounds (header timeout, byte bound on prompts, per-stream buffer and HTTP
write timeout); a prober meanwhile times gRPC health and HTTP /health.

Pass = zero unexpected errors, no slot leak (afterwards the running and
waiting gauges read 0 and the server admits a full max_batch_size +
max_waiting at once), the server is SERVING, no ERROR in the
server log, server RSS growth under 5 % from just after warm-up to the
end, no file-descriptor leak, and probe latency p99 under --max-probe-p99.
Prints a JSON report (also written with --report).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import pathlib
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc
import psutil
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from harness import ServerProcess, health_status  # noqa: E402

from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb  # noqa: E402
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc  # noqa: E402

OK = grpc.StatusCode.OK
FULL = grpc.StatusCode.RESOURCE_EXHAUSTED
CANCELLED = grpc.StatusCode.CANCELLED
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
INVALID = grpc.StatusCode.INVALID_ARGUMENT

# The server's HTTP bounds in the soak: short, so attackers cycle often.
HEADER_TIMEOUT, WRITE_TIMEOUT = 3.0, 5.0
# Tokens a non-reading client may fall behind before the server ends its
# request (the default 256 is meant for real clients; with the client's 4 KB
# HTTP/2 window, ~50 tokens in all), and how long the gRPC non-reader does
# not read.
MAX_BUFFERED_TOKENS, NO_READ_HOLD = 8, 30.0
HUGE_PROMPT = "All work and no play makes Jack a dull boy. " * 23_000  # ~1 MB, inside --max-request-bytes

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a KV cache is in two sentences.",
    "def fib(n):",
    "法国的首都是哪里？",
    "List five prime numbers.",
    "Tell me a story about a fox.",
]

_KILLED_CLIENT = """
import sys, time, grpc
from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb, qwen_service_pb2_grpc as pb_grpc
channel = grpc.insecure_channel(sys.argv[1])
request = pb.ChatRequest(messages=[pb.Message(role="user", content="Tell me a long story.")], max_tokens=int(sys.argv[2]))
try:
    stream = pb_grpc.QwenServiceStub(channel).ChatStream(request)
    next(stream)
    print("streaming", flush=True)
except grpc.RpcError as exc:
    print(exc.code().name, flush=True)
time.sleep(600)
"""


# Small, fixed HTTP/2 windows (no BDP probing), so not reading stops the server's writes.
_NO_READ_CLIENT = """
import sys, time, grpc
from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb, qwen_service_pb2_grpc as pb_grpc
target, max_tokens, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
channel = grpc.insecure_channel(target, options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4096)])
request = pb.ChatRequest(messages=[pb.Message(role="user", content="Tell me a long story.")], max_tokens=max_tokens)
admit_by = time.monotonic() + 10
try:
    while True:  # retry until admitted, as a determined attacker would
        stream = pb_grpc.QwenServiceStub(channel).ChatStream(request, timeout=hold + 30)
        try:
            next(stream)  # admitted
            break
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > admit_by:
                raise
            time.sleep(0.1)
    time.sleep(hold)  # not reading
    for _ in stream:
        pass
    print("OK")
except grpc.RpcError as exc:
    behind = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "behind reading its stream" in exc.details()
    print("slow-consumer" if behind else exc.code().name)
"""


def _request(rng: random.Random, max_tokens: int) -> pb.ChatRequest:
    request = pb.ChatRequest(
        messages=[pb.Message(role="user", content=rng.choice(PROMPTS))], max_tokens=rng.randint(1, max_tokens)
    )
    if rng.random() < 0.5:
        request.temperature = rng.choice([0.0, 0.7, 1.0])
        request.seed = rng.randrange(2**31)
    if rng.random() < 0.2:
        request.stop.append(rng.choice(["\n\n", ".", "the"]))
    return request


class Soak:
    def __init__(self, target: str, max_tokens: int, rng: random.Random) -> None:
        self.target = target
        self.max_tokens = max_tokens
        self.rng = rng
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.unexpected: list[str] = []
        self.refused = False
        self.attack_seconds: list[float] = []  # huge prompts' time to refusal
        self.probe_seconds: dict[str, list[float]] = {"grpc": [], "http": []}

    def record(self, action: str, code: grpc.StatusCode, allowed: set, details: str = "") -> None:
        self.outcomes[f"{action}:{code.name}"] += 1
        self.refused = self.refused or code == FULL
        if code not in allowed:
            self.unexpected.append(f"{action}: {code.name} {details}"[:500])

    async def _stream(self, stub, request, *, timeout=None, stop_after=None, channel=None):
        """(code, details, responses) of a stream; stop_after=k cancels (or,
        with channel, closes the whole connection) after k messages."""
        responses = []
        call = stub.ChatStream(request, timeout=timeout)
        try:
            async for response in call:
                responses.append(response)
                if stop_after is not None and len(responses) >= stop_after and not response.is_final:
                    if channel is not None:
                        await channel.close(grace=None)
                    else:
                        call.cancel()
            return OK, "", responses
        except asyncio.CancelledError:
            return CANCELLED, "", responses
        except aio.AioRpcError as exc:
            return exc.code(), exc.details() or "", responses

    def _check_answer(self, action: str, responses) -> None:
        final = responses[-1] if responses else None
        if (
            final is None
            or not final.is_final
            or final.finish_reason not in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        ):
            self.unexpected.append(f"{action}: stream ended without a final answer: {final}")

    async def one_action(self, stub) -> None:
        rng = self.rng
        action = rng.choices(
            ["stream", "unary", "cancel", "deadline", "disconnect", "invalid", "small"],
            weights=[30, 15, 15, 15, 10, 5, 10],
        )[0]
        request = _request(rng, self.max_tokens)
        if action == "stream":
            code, details, responses = await self._stream(stub, request, timeout=300)
            self.record(action, code, {OK, FULL}, details)
            if code == OK:
                self._check_answer(action, responses)
        elif action == "unary":
            try:
                reply = await stub.Chat(request, timeout=300)
                self.record(action, OK, {OK})
                if not reply.is_final:
                    self.unexpected.append(f"unary: not final: {reply}")
            except aio.AioRpcError as exc:
                self.record(action, exc.code(), {FULL}, exc.details() or "")
        elif action == "cancel":
            code, details, _ = await self._stream(stub, request, timeout=300, stop_after=rng.randint(1, 4))
            self.record(action, code, {OK, FULL, CANCELLED}, details)
        elif action == "deadline":
            # Log-uniform from 10 ms to 5 s: some expire in the queue, some
            # mid-stream, some never (on the tiny and on the real model).
            timeout = math.exp(rng.uniform(math.log(0.01), math.log(5.0)))
            code, details, responses = await self._stream(stub, request, timeout=timeout)
            self.record(action, code, {OK, FULL, DEADLINE}, details)
            if code == OK:
                self._check_answer(action, responses)
        elif action == "disconnect":
            channel = aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
            try:
                code, details, _ = await self._stream(
                    pb_grpc.QwenServiceStub(channel),
                    request,
                    timeout=300,
                    stop_after=rng.randint(1, 4),
                    channel=channel,
                )
            finally:
                await channel.close()
            self.record(action, code, {OK, FULL, CANCELLED}, details)
        elif action == "invalid":
            request.max_tokens = -rng.randint(1, 10)
            try:
                await stub.Chat(request, timeout=60)
                self.record(action, OK, {INVALID})
            except aio.AioRpcError as exc:
                self.record(action, exc.code(), {INVALID}, exc.details() or "")
        else:
            try:
                if rng.random() < 0.5:
                    await stub.CountTokens(pb.CountTokensRequest(messages=request.messages), timeout=60)
                else:
                    await stub.ListModels(pb.ListModelsRequest(), timeout=60)
                self.record(action, OK, {OK})
            except aio.AioRpcError as exc:
                self.record(action, exc.code(), set(), exc.details() or "")

    async def worker(self, deadline: float) -> None:
        async with aio.insecure_channel(self.target) as channel:
            stub = pb_grpc.QwenServiceStub(channel)
            while time.monotonic() < deadline:
                self.refused = False
                await self.one_action(stub)
                if self.refused:
                    # Like a client honouring grpc-retry-pushback-ms, but sooner,
                    # so the server stays at its limit.
                    await asyncio.sleep(self.rng.uniform(0.1, 0.6))

    # ----- attackers --------------------------------------------------------
    async def slowloris(self, host: str, port: int, deadline: float) -> None:
        """Headers a byte every 100 ms, never complete: the server must close the connection."""
        request = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100_000
        while time.monotonic() + HEADER_TIMEOUT + 5 < deadline:
            reader, writer = await asyncio.open_connection(host, port)
            started, closed = time.monotonic(), False
            try:
                for byte in request:
                    writer.write(bytes([byte]))
                    try:
                        closed = await asyncio.wait_for(reader.read(1), 0.1) == b""
                    except TimeoutError:
                        pass
                    except ConnectionError:
                        closed = True
                    if closed or time.monotonic() - started > HEADER_TIMEOUT + 5:
                        break
            finally:
                writer.close()
            self.attack("slowloris", "closed" if closed else "still-open")

    async def silent(self, host: str, port: int, deadline: float, count: int = 50) -> None:
        """Batches of connections that send nothing: all must be closed by the server."""
        while time.monotonic() + HEADER_TIMEOUT + 5 < deadline:
            connections = [await asyncio.open_connection(host, port) for _ in range(count)]

            async def closed(reader) -> bool:
                try:
                    return await asyncio.wait_for(reader.read(1), HEADER_TIMEOUT + 5) == b""
                except ConnectionError:
                    return True
                except TimeoutError:
                    return False

            results = await asyncio.gather(*(closed(reader) for reader, _ in connections))
            for _, writer in connections:
                writer.close()
            for result in results:
                self.attack("silent", "closed" if result else "still-open")
            await asyncio.sleep(self.rng.uniform(1, 3))

    async def huge_prompts(self, stub, deadline: float) -> None:
        """~1 MB prompts: refused by their byte length alone (INVALID_ARGUMENT), at once."""
        request = pb.ChatRequest(messages=[pb.Message(role="user", content=HUGE_PROMPT)], max_tokens=1)
        while time.monotonic() + 5 < deadline:
            started = time.monotonic()
            try:
                await stub.Chat(request, timeout=60)
                code = OK
            except aio.AioRpcError as exc:
                code = exc.code()
            self.record("huge-prompt", code, {INVALID})
            self.attack_seconds.append(time.monotonic() - started)
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))

    async def no_read_grpc(self, deadline: float, max_tokens: int) -> None:
        """A long stream nobody reads, from a process of its own (as a real
        client): once admitted, it is not read for NO_READ_HOLD seconds
        (long enough for ~100 tokens even at the slowest soak rates). The server's writes block, and it ends the request once the
        client is --max-buffered-tokens behind: read at last, the stream ends
        with RESOURCE_EXHAUSTED "... behind reading its stream" (or OK if the
        answer ended first; RESOURCE_EXHAUSTED "at capacity" if not admitted
        within 10 s of retrying)."""
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        while time.monotonic() + NO_READ_HOLD + 15 < deadline:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _NO_READ_CLIENT,
                self.target,
                str(max_tokens),
                str(NO_READ_HOLD),
                stdout=subprocess.PIPE,
                env=env,
                cwd=str(REPO_ROOT),
            )
            try:
                outcome = (await asyncio.wait_for(proc.stdout.read(), NO_READ_HOLD + 60)).decode().strip()
            except TimeoutError:
                outcome = "hung"
            finally:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
            self.attack("no-read-grpc", outcome, {"slow-consumer", "OK", "RESOURCE_EXHAUSTED"})
            if outcome == "RESOURCE_EXHAUSTED":
                await asyncio.sleep(self.rng.uniform(0.5, 1.5))

    async def no_read_http(self, host: str, port: int, deadline: float, max_tokens: int) -> None:
        """A long SSE stream nobody reads: the connection must be closed by the
        write timeout (or the answer end, or a 429 when full)."""
        body = json.dumps(
            {
                "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": max_tokens,
                "stream": True,
            }
        ).encode()
        while time.monotonic() + WRITE_TIMEOUT + 40 < deadline:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            try:
                await loop.sock_connect(sock, (host, port))
                await loop.sock_sendall(
                    sock,
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
                )
                await asyncio.sleep(WRITE_TIMEOUT + 15)  # not reading
                received, started = b"", time.monotonic()
                while time.monotonic() - started < 20:
                    try:
                        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 20)
                    except (TimeoutError, ConnectionError):
                        break
                    if not chunk:
                        break
                    received += chunk
                status = received[9:12].decode(errors="replace")
                if status == "200":
                    outcome = "complete" if b"[DONE]" in received else "cut-off"
                else:
                    outcome = status
                self.attack("no-read-http", outcome, {"complete", "cut-off", "429"})
            finally:
                sock.close()

    async def prober(self, host: str, port: int, deadline: float) -> None:
        """gRPC health and HTTP /health every 0.5 s: their latency while under attack."""
        async with aio.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                started = time.monotonic()
                await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
                self.probe_seconds["grpc"].append(time.monotonic() - started)
                started = time.monotonic()
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                reply = await asyncio.wait_for(reader.read(), 30)
                writer.close()
                self.probe_seconds["http"].append(time.monotonic() - started)
                if not reply.startswith(b"HTTP/1.1 200"):
                    self.unexpected.append(f"probe: /health answered {reply[:40]!r}")
                await asyncio.sleep(0.5)

    def attack(self, name: str, outcome: str, allowed: set | None = None) -> None:
        self.outcomes[f"{name}:{outcome}"] += 1
        if outcome not in (allowed or {"closed"}):
            self.unexpected.append(f"{name}: {outcome}")

    async def killer(self, deadline: float, every: float) -> None:
        """Now and then a separate client process is SIGKILLed mid-stream."""
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        while time.monotonic() + every < deadline:
            await asyncio.sleep(self.rng.uniform(0.5 * every, 1.5 * every))
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _KILLED_CLIENT,
                self.target,
                str(self.max_tokens),
                stdout=subprocess.PIPE,
                env=env,
                cwd=str(REPO_ROOT),
            )
            try:
                line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode().strip()
            finally:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
            code = OK if line == "streaming" else getattr(grpc.StatusCode, line, grpc.StatusCode.UNKNOWN)
            self.record("sigkill-client", code, {OK, FULL}, line)


async def _capacity_check(target: str, count: int, max_tokens: int) -> list[str]:
    """`count` concurrent calls right after the load: all must be admitted."""
    channels = [aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)]
    try:
        stubs = [pb_grpc.QwenServiceStub(c) for c in channels]
        request = pb.ChatRequest(messages=[pb.Message(role="user", content="hi")], max_tokens=min(8, max_tokens))

        async def one(i):
            try:
                await stubs[i % 4].Chat(request, timeout=300)
                return "OK"
            except aio.AioRpcError as exc:
                return exc.code().name

        return await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        for channel in channels:
            await channel.close()


def _rss_sampler(pid: int, samples: list, stop: asyncio.Event, interval: float):
    process = psutil.Process(pid)

    async def run():
        start = time.monotonic()
        while not stop.is_set():
            samples.append((time.monotonic() - start, process.memory_info().rss))
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass

    return run()


def engine_gauges(url: str) -> dict[str, float]:
    """qwen_requests_running / qwen_requests_waiting from the server's /metrics."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in ("qwen_requests_running", "qwen_requests_waiting"):
            values[name] = float(line.rsplit(" ", 1)[1])
    return values


def _log_errors(log: str) -> tuple[list[list[str]], int]:
    """ERROR records of the server log (each with its traceback lines), and
    the number of grpcio's "ExecuteBatchError raised in core" records: grpcio
    logs those when a response or status could not be sent because the
    client had just gone (a race inside grpcio between the failed send and
    its cancellation notice; the request was over either way). They are
    counted, not failed on."""
    records: list[list[str]] = []
    for line in log.splitlines():
        if line[:2].isdigit() or not records:  # a new "2026-... LEVEL name: message" record
            records.append([line])
        else:
            records[-1].append(line)
    errors, races = [], 0
    for record in records:
        text = "\n".join(record)
        if " ERROR " not in record[0] and "Traceback" not in text:
            continue
        if "ExecuteBatchError raised in core by servicer method" in record[0] and "ExecuteBatchError" in record[-1]:
            races += 1
        else:
            errors.append(record)
    return errors, races


async def _soak(args, server: ServerProcess) -> dict:
    rng = random.Random(args.seed)
    soak = Soak(server.target, args.max_tokens, rng)
    samples: list[tuple[float, int]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_rss_sampler(server.process.pid, samples, stop, args.rss_interval))
    process = psutil.Process(server.process.pid)
    fds_before = process.num_fds()
    started = time.monotonic()
    deadline = started + args.duration
    tasks = [soak.worker(deadline) for _ in range(args.concurrency)]
    if args.kill_every > 0:
        tasks.append(soak.killer(deadline, args.kill_every))
    host, port = server.host, server.http_port
    tasks.append(soak.prober(host, port, deadline))
    if args.attackers:
        attack_channel = aio.insecure_channel(server.target)
        tasks += [
            soak.slowloris(host, port, deadline),
            soak.silent(host, port, deadline),
            soak.huge_prompts(pb_grpc.QwenServiceStub(attack_channel), deadline),
            soak.no_read_grpc(deadline, args.no_read_tokens),
            soak.no_read_http(host, port, deadline, args.no_read_tokens),
        ]
    await asyncio.gather(*tasks)
    if args.attackers:
        await attack_channel.close()
    elapsed = time.monotonic() - started
    stop.set()
    await sampler

    capacity = args.max_batch_size + args.max_waiting
    admitted = await _capacity_check(server.target, capacity, args.max_tokens)
    serving = health_status(server.target) == 1
    gauges = engine_gauges(server.metrics_url)
    log = server.log
    log_errors, send_races = _log_errors(log)
    await asyncio.sleep(1.0)  # closed client connections reach the server
    fds_after = process.num_fds()
    probes = {name: _summary(values) for name, values in soak.probe_seconds.items()}

    warmup = args.warmup if args.warmup is not None else 0.2 * args.duration
    loaded = [(t, rss) for t, rss in samples if t >= warmup]
    window = max(1, len(loaded) // 10)
    rss_start = statistics.median(rss for _, rss in loaded[:window]) if loaded else 0
    rss_end = statistics.median(rss for _, rss in loaded[-window:]) if loaded else 0
    growth = (rss_end - rss_start) / rss_start if rss_start else float("nan")
    report = {
        "duration_s": round(elapsed, 1),
        "concurrency": args.concurrency,
        "calls": sum(soak.outcomes.values()),
        "outcomes": dict(sorted(soak.outcomes.items())),
        "unexpected_errors": soak.unexpected[:50],
        "unexpected_count": len(soak.unexpected),
        "capacity_check": {"concurrent": capacity, "admitted": admitted.count("OK"), "codes": sorted(set(admitted))},
        "serving_after": serving,
        "gauges_after": gauges,
        "server_log_errors": {"count": len(log_errors), "first": log_errors[0][:40] if log_errors else []},
        "grpc_send_to_gone_client": send_races,
        "open_fds": {"before": fds_before, "after": fds_after},
        "probe_latency_s": probes,
        "huge_prompt_refusal_s": _summary(soak.attack_seconds),
        "rss_mib": {
            "warmup_s": warmup,
            "after_warmup": round(rss_start / 2**20, 1),
            "end": round(rss_end / 2**20, 1),
            "max": round(max((rss for _, rss in samples), default=0) / 2**20, 1),
            "growth_pct": round(100 * growth, 2),
            "samples": len(samples),
        },
    }
    report["passed"] = bool(
        not soak.unexpected
        and admitted.count("OK") == capacity
        and gauges == {"qwen_requests_running": 0.0, "qwen_requests_waiting": 0.0}
        and serving
        and not log_errors
        and growth < args.max_rss_growth
        and len(loaded) >= 2
        and fds_after <= fds_before + FD_SLACK
        and all(p["p99"] < args.max_probe_p99 for p in probes.values())
    )
    return report


# Descriptors the server may hold after the load beyond those before it
# (gRPC's own pollers and channels settle at slightly different counts).
FD_SLACK = 16


def _summary(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "p50": round(ordered[len(ordered) // 2], 4),
        "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 4),
        "max": round(ordered[-1], 4),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before RSS is tracked (default 20%%)")
    parser.add_argument("--model", default=None, help="model folder (default: the one `make model` made)")
    parser.add_argument("--tiny", action="store_true", help="build and serve a tiny random model instead")
    parser.add_argument("--concurrency", type=int, default=10, help="client workers")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--max-waiting", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48, help="largest max_tokens a call asks for")
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between SIGKILLed clients (0: never)")
    parser.add_argument("--rss-interval", type=float, default=1.0)
    parser.add_argument("--max-rss-growth", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-attackers",
        dest="attackers",
        action="store_false",
        help="leave out slowloris, silent connections, huge prompts and non-reading clients",
    )
    parser.add_argument("--no-read-tokens", type=int, default=2000, help="max_tokens of the non-reading clients")
    parser.add_argument(
        "--max-probe-p99",
        type=float,
        default=1.0,
        help="pass only if gRPC health and HTTP /health answer within this (p99, seconds)",
    )
    parser.add_argument("--report", default=None, help="also write the JSON report here")
    return parser.parse_args(argv)


def run(argv=None) -> dict:
    args = parse_args(argv)
    if args.tiny:
        from tiny_model import build_tiny_model

        model = build_tiny_model(pathlib.Path(tempfile.mkdtemp(prefix="soak-tiny-")))
    else:
        from service.config import default_model_path

        model = args.model or default_model_path()
    server = ServerProcess(
        model,
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-waiting",
        str(args.max_waiting),
        "--max-tokens-limit",
        str(max(args.max_tokens, args.no_read_tokens, 8)),
        "--max-tokens-default",
        str(min(args.max_tokens, 8)),
        "--drain-timeout",
        "5",
        "--http-header-timeout",
        str(HEADER_TIMEOUT),
        "--http-write-timeout",
        str(WRITE_TIMEOUT),
        "--max-buffered-tokens",
        str(MAX_BUFFERED_TOKENS),
    )
    try:
        server.wait_serving(timeout=300)
        report = asyncio.run(_soak(args, server))
    finally:
        report_exit = server.terminate()
        server.close()
    report["server_exit_code"] = report_exit
    report["passed"] = report["passed"] and report_exit == 0
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        pathlib.Path(args.report).write_text(text + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if run()["passed"] else 1)
