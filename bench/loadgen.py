"""Closed-loop load generator for qwen-serve, optionally side by side with
llama.cpp's llama-server on the same GGUF.

    make bench                                    # our server only, full matrix
    make bench-llamacpp                           # ours vs llama-server, same run
    python bench/loadgen.py --target 127.0.0.1:50051       # a server already running
    python bench/loadgen.py --concurrency 1,2 --rounds 1 --min-requests 1 --workloads short   # smoke

For every workload (short ~30-token prompts, long ~1000-token prompts) and
every concurrency level C, C streams each send requests back to back (a new
one as soon as the previous answer ended) for a fixed number of rounds;
every request asks for --max-tokens tokens, greedy. Each server is started
fresh for each level, configured for it (ours: --max-batch-size C,
llama-server: -np C, the same per-request context), and only one runs at a
time. With --compare-llamacpp every level is measured --alternations times
(default 5), the servers taking turns in ABBA order (ours, llama, llama,
ours, ...) so a drift of the host's speed during the run hits both alike;
ratios are the median of the per-round ratios, with the worst round and the
spread beside them. --co-runner runs a memory-bandwidth-heavy process
(bench/membw.py) beside each server in turn. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import pathlib
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from grpc import aio  # noqa: E402

from bench import procstat, prompts  # noqa: E402
from bench.sse_client import HttpConnection  # noqa: E402
from qwen_grpc_client import build_request, finish_reason_name  # noqa: E402
from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb  # noqa: E402
from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc  # noqa: E402
from service.config import default_cache_dir, default_model_path  # noqa: E402
from service.engine.cpu import cpu_flags, cpu_info  # noqa: E402

GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"  # as service/model_fetch.py names it
RESULTS_DIR = ROOT / "bench" / "results"
CONTEXT_MARGIN = 64  # tokens per slot beyond prompt + max_tokens (template differences, safety)


@dataclasses.dataclass(frozen=True)
class Target:
    """A bound on the median over rounds of ours/llama ("ratio") or on our own
    figure in its worst round ("abs"); `worst` bounds the worst round's ratio too."""

    op: str  # ">=" or "<="
    bound: float
    kind: str  # "ratio" or "abs"
    text: str
    worst: float | None = None

    def holds(self, value: float | None, bound: float | None = None) -> bool | None:
        if value is None:
            return None
        bound = self.bound if bound is None else bound
        return value >= bound if self.op == ">=" else value <= bound


# The project's speed targets (issues #3 and #17), keyed by (metric key, concurrency).
TARGETS = {
    ("agg_tok_s", 16): Target(">=", 2.5, "ratio", "≥ 2.5×"),
    ("agg_tok_s", 32): Target(">=", 2.5, "ratio", "≥ 2.5×"),
    ("decode_tok_s", 1): Target(">=", 1.3, "ratio", "≥ 1.3×, worst round ≥ 1.1×", worst=1.1),
    ("ttft_p50", 1): Target("<=", 0.6, "ratio", "≤ 0.6×"),
    ("ttft_p95", 16): Target("<=", 0.3, "ratio", "≤ 0.3×"),
    ("itl_p95", 16): Target("<=", 0.100, "abs", "ours ≤ 100 ms"),
    ("rss_peak", None): Target("<=", 1.6e9, "abs", "ours ≤ 1.6 GB"),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float, weights: Sequence[float] | None = None) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); with weights, of the weighted
    distribution (a value with weight 2 counts as two samples)."""
    if not values:
        return None
    if weights is None:
        ordered = sorted(values)
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        return ordered[rank - 1]
    pairs = sorted(zip(values, weights))
    total = sum(w for _, w in pairs)
    threshold = q / 100 * total
    cumulative = 0.0
    for value, weight in pairs:
        cumulative += weight
        if cumulative >= threshold - 1e-12:
            return value
    return pairs[-1][0]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------- the clients


@dataclasses.dataclass
class RequestResult:
    stream: int
    round: int
    request_number: int  # which prompt: the same on both servers
    started: float  # seconds since the level started
    ok: bool = False
    error: str | None = None
    ttft: float | None = None  # send -> first non-empty content
    total: float | None = None  # send -> end of the stream
    prompt_tokens: int = 0
    completion_tokens: int = 0
    pieces: int = 0  # messages/events that carried content
    finish_reason: str = ""
    gaps: list[float] = dataclasses.field(default_factory=list)  # between content pieces, seconds
    text_chars: int = 0
    server_timings: dict | None = None  # the server's own figures (llama-server's timings; ours: cache_n)

    @property
    def decode_seconds(self) -> float | None:
        return sum(self.gaps) if self.gaps else None

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens after the first, over the time from first to last content piece."""
        seconds = self.decode_seconds
        if not seconds or self.completion_tokens < 2:
            return None
        return (self.completion_tokens - 1) / seconds

    def itl_samples(self) -> tuple[list[float], list[float]]:
        """Per-token inter-token latency samples with weights. A piece can carry
        more than one token (the detokenizer holds back incomplete characters,
        stop-string prefixes); from the final usage, the gaps carry
        (completion_tokens - 1) tokens in all, so each gap is divided by the
        mean tokens per gap and weighted by it."""
        if not self.gaps:
            return [], []
        tokens_per_gap = max(1.0, (self.completion_tokens - 1) / len(self.gaps))
        return [g / tokens_per_gap for g in self.gaps], [tokens_per_gap] * len(self.gaps)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["gaps_ms"] = [round(g * 1000, 3) for g in data.pop("gaps")]
        data["decode_tok_s"] = self.decode_tok_s
        return data


class Client:
    """One stream's connection to a server."""

    name = ""

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    def stream(self, messages: list[dict[str, str]], max_tokens: int) -> AsyncIterator[tuple[str, Any]]:
        """Yields ("piece", text), then ("final", (prompt_tokens, completion_tokens, finish_reason, extra))."""
        raise NotImplementedError


class OursClient(Client):
    name = "ours"

    def __init__(self, target: str) -> None:
        # Own connection per stream (a local subchannel pool stops gRPC from
        # sharing one TCP connection between the channels of this process).
        self.channel = aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = pb_grpc.QwenServiceStub(self.channel)

    async def connect(self) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), 30)

    async def close(self) -> None:
        await self.channel.close()

    async def count_tokens(self, messages: list[dict[str, str]]) -> int:
        request = pb.CountTokensRequest(messages=[pb.Message(**m) for m in messages])
        return (await self.stub.CountTokens(request, timeout=60)).prompt_tokens

    async def stream(self, messages, max_tokens, timeout=None):
        # Greedy, and no repetition penalty (our default is 1.05, llama-server's 1.0).
        request = build_request(messages, temperature=0.0, max_tokens=max_tokens, repetition_penalty=1.0)
        call = self.stub.ChatStream(request, timeout=timeout)
        try:
            async for response in call:
                if response.content:
                    yield "piece", response.content
                if response.is_final:
                    usage = response.usage
                    # "cache_n": prompt tokens reused from the prefix cache, as llama-server's timings name it.
                    extra = {"cache_n": usage.cached_prompt_tokens}
                    yield "final", (usage.prompt_tokens, usage.completion_tokens, finish_reason_name(response), extra)
        finally:
            call.cancel()


class LlamaClient(Client):
    name = "llama"

    def __init__(self, host: str, port: int) -> None:
        self.http = HttpConnection(host, port)

    async def connect(self) -> None:
        status, _ = await self.http.request_json("GET", "/health")
        if status != 200:
            raise RuntimeError(f"llama-server /health answered {status}")

    async def close(self) -> None:
        await self.http.close()

    async def stream(self, messages, max_tokens, timeout=None):
        body = {
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max_tokens,
            "temperature": 0,
            "repeat_penalty": 1.0,
        }
        usage = None
        finish = ""
        timings = None
        async for data in self.http.post_sse("/v1/chat/completions", body):
            if data == "[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"llama-server error: {chunk['error']}")
            for choice in chunk.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    yield "piece", content
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("timings"):
                timings = chunk["timings"]
        if usage is None:
            raise RuntimeError("llama-server sent no usage")
        yield "final", (usage["prompt_tokens"], usage["completion_tokens"], finish, timings)


async def one_request(client: Client, messages, max_tokens: int, result: RequestResult, timeout: float) -> None:
    pieces_at: list[float] = []

    async def consume() -> None:
        async for kind, value in client.stream(messages, max_tokens):
            now = time.perf_counter()
            if kind == "piece":
                pieces_at.append(now)
                result.text_chars += len(value)
            else:
                result.prompt_tokens, result.completion_tokens, result.finish_reason, result.server_timings = value
                result.ok = True

    sent = time.perf_counter()
    try:
        await asyncio.wait_for(consume(), timeout)
        result.total = time.perf_counter() - sent
        if not result.ok:
            result.error = "stream ended without a final message"
    except (TimeoutError, Exception) as exc:  # a failed request is counted, never fatal
        result.ok = False
        result.total = time.perf_counter() - sent
        result.error = f"{type(exc).__name__}: {exc}"[:500]
    if pieces_at:
        result.ttft = pieces_at[0] - sent
        result.pieces = len(pieces_at)
        result.gaps = [b - a for a, b in zip(pieces_at, pieces_at[1:])]


# ------------------------------------------------------------- workloads


@dataclasses.dataclass
class Workload:
    name: str
    make_messages: Callable[[int], list[dict[str, str]]]
    description: str
    prompt_tokens: dict = dataclasses.field(default_factory=dict)  # min/mean/max over a sample, by our CountTokens

    def messages(self, request_number: int) -> list[dict[str, str]]:
        return self.make_messages(request_number)


async def build_workloads(names: list[str], counter: OursClient, long_target: int) -> dict[str, Workload]:
    workloads: dict[str, Workload] = {}
    if "short" in names:
        workloads["short"] = Workload("short", prompts.short_messages, "one-line coding task, ~30 tokens")
    if "long" in names:
        # Keep as many lines of the fixed document as fit the token target.
        lo, hi = 1, prompts.long_document_lines()
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if await counter.count_tokens(prompts.long_messages(1, mid)) <= long_target:
                lo = mid
            else:
                hi = mid - 1
        lines = lo

        def make_long(n: int, lines: int = lines) -> list[dict[str, str]]:
            return prompts.long_messages(n, lines)

        workloads["long"] = Workload(
            "long", make_long, f"code review of a fixed module ({lines} lines), ~{long_target} tokens"
        )
    for workload in workloads.values():
        counts = [await counter.count_tokens(workload.messages(n)) for n in (1, 9, 99, 999)]
        digest = hashlib.sha256(json.dumps([workload.messages(n) for n in range(1, 65)]).encode()).hexdigest()[:16]
        workload.prompt_tokens = {
            "min": min(counts),
            "max": max(counts),
            "mean": sum(counts) / len(counts),
            "sha256_16": digest,
        }
    return workloads


# ----------------------------------------------------------------- servers


@dataclasses.dataclass
class LevelPlan:
    workload: Workload
    concurrency: int
    requests_per_stream: int
    max_tokens: int
    ctx_per_slot: int


class OursServer:
    """qwen-serve started for one level (tests/harness.ServerProcess), or a running one."""

    name = "ours"

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.proc = None
        self.target = args.target
        self.pid = args.target_pid
        self.start_seconds = None
        self.argv: list[str] = []
        self.engine: dict[str, str] | None = None  # qwen_engine_info's labels (not known with --target)

    def start(self, plan: LevelPlan | None) -> None:
        if self.args.target:
            if self.pid is None:
                self.pid = _pid_listening_on(self.args.target)
            _wait_serving(self.args.target, self.args.server_timeout)
            return
        from harness import ServerProcess

        extra = [
            "--threads",
            str(self.args.threads),
            "--log-level",
            "warning",
        ]
        if plan is not None:
            extra += [
                "--max-batch-size",
                str(plan.concurrency),
                "--max-waiting",
                str(max(64, plan.concurrency)),
                "--max-model-len",
                str(plan.ctx_per_slot),
                "--max-tokens-default",
                str(plan.max_tokens),
                "--max-tokens-limit",
                str(plan.max_tokens),
            ]
        extra += shlex.split(self.args.ours_args)
        self.proc = ServerProcess(self.args.model, *extra)
        self.argv = self.proc.argv
        self.start_seconds = self.proc.wait_serving(self.args.server_timeout)
        self.target = self.proc.target
        self.pid = self.proc.process.pid
        self.engine = engine_info(self.proc.metrics_url)

    def client(self) -> OursClient:
        return OursClient(self.target)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.close()
            self.proc = None


class LlamaServer:
    name = "llama"

    def __init__(self, args: argparse.Namespace, binary: pathlib.Path) -> None:
        self.args = args
        self.binary = binary
        self.proc = None
        self.pid = None
        self.start_seconds = None
        self.argv: list[str] = []
        self.engine = None

    def start(self, plan: LevelPlan) -> None:
        from bench.llama_server import LlamaServerProcess

        port = _free_port()
        self.proc = LlamaServerProcess(
            self.binary,
            self.args.gguf,
            parallel=plan.concurrency,
            ctx_per_slot=plan.ctx_per_slot,
            threads=self.args.threads,
            port=port,
            extra_args=shlex.split(self.args.llama_args),
        )
        self.argv = self.proc.argv
        self.start_seconds = self.proc.wait_ready(self.args.server_timeout)
        self.pid = self.proc.pid

    def client(self) -> LlamaClient:
        return LlamaClient(self.proc.host, self.proc.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.close()
            self.proc = None


def engine_info(metrics_url: str) -> dict[str, str] | None:
    """The labels of the server's qwen_engine_info: the quantization and
    kernels it settled on (a stale native build silently falls back to torch
    layers, several times slower), or None if it exposes none."""
    with urllib.request.urlopen(metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    match = re.search(r"^qwen_engine_info\{(.*)\} 1\.0$", text, re.MULTILINE)
    return dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) if match else None


def _engine_text(engine: dict[str, str] | None) -> str:
    if engine is None:
        return ""
    layers = "native layers" if engine.get("native_layers") == "true" else "TORCH LAYERS (is the native build stale?)"
    return f", {engine.get('quantization')}, {layers}"


def _wait_serving(target: str, timeout: float) -> None:
    from grpc_health.v1 import health_pb2
    from harness import health_status

    deadline = time.monotonic() + timeout
    while (status := health_status(target)) != health_pb2.HealthCheckResponse.SERVING:
        if time.monotonic() > deadline:
            raise SystemExit(f"{target} is not SERVING (health status {status}) after {timeout} s")
        time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pid_listening_on(target: str) -> int | None:
    """The pid of the process listening on target's TCP port (for RSS/CPU of a
    server we did not start), from /proc/net/tcp* and the fds in /proc/*/fd."""
    port = int(target.rsplit(":", 1)[1])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = pathlib.Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(fields[9])
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None


# ------------------------------------------------------------- one level


class CoRunner:
    """bench/membw.py running beside a server while one level is measured."""

    def __init__(self, mib: int) -> None:
        self.mib = mib
        self.result: dict | None = None

    def __enter__(self) -> CoRunner:
        argv = [sys.executable, str(ROOT / "bench" / "membw.py"), "--mib", str(self.mib)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise RuntimeError("the co-runner (bench/membw.py) did not start")
        self.cpu_start = procstat.process_cpu_seconds(self.proc.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        cpu = procstat.process_cpu_seconds(self.proc.pid) - self.cpu_start
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        self.result = {**json.loads(out.strip().splitlines()[-1]), "cpu_seconds": cpu, "mib": self.mib}


async def run_level(server, plan: LevelPlan, args: argparse.Namespace) -> dict:
    concurrency = plan.concurrency
    clients = [server.client() for _ in range(concurrency)]
    for client in clients:
        await client.connect()
    # Warm-up, not measured: one short answer, so lazy initialisation on either
    # side (first HTTP/2 or HTTP request, allocator) is out of the way.
    warm = RequestResult(stream=-1, round=-1, request_number=0, started=0.0)
    await one_request(clients[0], plan.workload.messages(0), min(16, plan.max_tokens), warm, args.request_timeout)
    if not warm.ok:
        raise RuntimeError(f"warm-up request failed on {server.name}: {warm.error}")

    results: list[RequestResult] = []
    level_start = 0.0

    async def stream_worker(stream: int) -> None:
        if args.ramp > 0 and concurrency > 1:
            await asyncio.sleep(args.ramp * stream / concurrency)
        for round_ in range(plan.requests_per_stream):
            number = 1 + stream + round_ * concurrency  # the same prompt for the same slot on every server
            result = RequestResult(stream, round_, number, time.perf_counter() - level_start)
            await one_request(
                clients[stream], plan.workload.messages(number), plan.max_tokens, result, args.request_timeout
            )
            results.append(result)

    co_runner = CoRunner(args.co_runner_mib) if args.co_runner else None
    sampler = procstat.Sampler(server.pid, interval=args.sample_interval) if server.pid else None
    with contextlib.ExitStack() as measuring:
        if co_runner:
            measuring.enter_context(co_runner)
        if sampler:
            measuring.enter_context(sampler)
        level_start = time.perf_counter()
        try:
            await asyncio.gather(*(stream_worker(s) for s in range(concurrency)))
            wall = time.perf_counter() - level_start
        finally:
            for client in clients:
                await client.close()
    process = sampler.result() if sampler else {"error": "server pid unknown (pass --target-pid)"}
    results.sort(key=lambda r: (r.round, r.stream))
    return {
        "wall_seconds": wall,
        "summary": summarize(results, wall, args),
        "process": process,
        "co_runner": co_runner.result if co_runner else None,
        "requests": [r.to_json() for r in results],
    }


def summarize(results: list[RequestResult], wall: float, args: argparse.Namespace) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    ttft_steady = [r.ttft for r in ok if r.ttft is not None and r.round > 0]
    itl_values: list[float] = []
    itl_weights: list[float] = []
    raw_gaps: list[float] = []
    for r in ok:
        values, weights = r.itl_samples()
        itl_values += values
        itl_weights += weights
        raw_gaps += r.gaps
    completion = sum(r.completion_tokens for r in ok)
    decode = [r.decode_tok_s for r in ok if r.decode_tok_s]
    finish: dict[str, int] = {}
    for r in ok:
        finish[r.finish_reason] = finish.get(r.finish_reason, 0) + 1
    pieces = sum(r.pieces for r in ok)
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_examples": sorted({r.error for r in results if r.error})[:3],
        "completion_tokens": completion,
        "prompt_tokens_mean": _mean([r.prompt_tokens for r in ok]),
        "completion_tokens_mean": _mean([r.completion_tokens for r in ok]),
        "completion_tokens_min": min((r.completion_tokens for r in ok), default=None),
        "finish_reasons": finish,
        "tokens_per_piece": completion / pieces if pieces else None,
        "agg_tok_s": completion / wall if wall > 0 else None,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p95": percentile(ttft, 95),
        "ttft_mean": _mean(ttft),
        "ttft_max": max(ttft, default=None),
        # From the second round on: newcomers joining streams that are already decoding.
        "ttft_steady_p50": percentile(ttft_steady, 50),
        "ttft_steady_p95": percentile(ttft_steady, 95),
        "itl_p50": percentile(itl_values, 50, itl_weights),
        "itl_p95": percentile(itl_values, 95, itl_weights),
        "itl_max": max(itl_values, default=None),
        "piece_gap_p50": percentile(raw_gaps, 50),
        "piece_gap_p95": percentile(raw_gaps, 95),
        "decode_tok_s_median": percentile(decode, 50),
        # llama-server reports how many prompt tokens it took from a slot's cache;
        # with distinct prompts this should stay at the template's first few tokens.
        "server_cached_prompt_tokens_mean": _mean(
            [r.server_timings["cache_n"] for r in ok if r.server_timings and "cache_n" in r.server_timings]
        ),
        "total_p50": percentile([r.total for r in ok], 50),
        "total_p95": percentile([r.total for r in ok], 95),
    }


# -------------------------------------------------------------- reporting


def _fmt(value: Any, scale: float = 1.0, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value * scale:.{digits}f}"


def markdown_levels(levels: list[dict], noise_threshold: float) -> str:
    head = (
        "| workload | server | C | round | reqs | err | prompt tok | out tok/req | agg tok/s | TTFT p50 ms | TTFT p95 ms "
        "| ITL p50 ms | ITL p95 ms | 1-stream decode tok/s | RSS peak MiB | server CPU s | others' cores | co-runner GiB/s |"
    )
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for level in levels:
        s, p = level["summary"], level["process"]
        others = _others_cores(level) if "wall_seconds" in p else None
        noisy = " ⚠" if others is not None and others > noise_threshold else ""
        co_runner = level.get("co_runner")
        rows.append(
            f"| {level['workload']} | {level['server']} | {level['concurrency']} | {level.get('alternation', 0) + 1} "
            f"| {s['requests']} | {s['errors']} "
            f"| {_fmt(s['prompt_tokens_mean'])} | {_fmt(s['completion_tokens_mean'], digits=1)} | {_fmt(s['agg_tok_s'], digits=1)} "
            f"| {_fmt(s['ttft_p50'], 1000)} | {_fmt(s['ttft_p95'], 1000)} | {_fmt(s['itl_p50'], 1000, 1)} "
            f"| {_fmt(s['itl_p95'], 1000, 1)} | {_fmt(s['decode_tok_s_median'], digits=1) if level['concurrency'] == 1 else '—'} "
            f"| {_fmt(p.get('server_rss_peak_bytes'), 1 / 2**20)} | {_fmt(p.get('server_cpu_seconds'), digits=1)} "
            f"| {_fmt(others, digits=2)}{noisy} | {_fmt(co_runner and co_runner['gib_per_s'], digits=1)} |"
        )
    return "\n".join(rows)


def _metric(levels: list[dict], server: str, workload: str, key: str, concurrency: int | None):
    candidates = [lv for lv in levels if lv["server"] == server and lv["workload"] == workload]
    if key in ("rss_peak", "rss_anon_peak"):
        field = "server_rss_peak_bytes" if key == "rss_peak" else "server_rss_anon_peak_sampled_bytes"
        values = [lv["process"].get(field) for lv in candidates]
        values = [v for v in values if v]
        return max(values) if values else None
    for level in candidates:
        if level["concurrency"] == concurrency:
            return level["summary"].get("decode_tok_s_median" if key == "decode_tok_s" else key)
    return None


RATIO_ROWS = [
    ("aggregate tok/s @{c}", "agg_tok_s", "all", 1, 1),
    ("single-stream decode tok/s", "decode_tok_s", 1, 1, 1),
    ("single-stream TTFT p50 ms", "ttft_p50", 1, 1000, 0),
    ("TTFT p95 ms @16", "ttft_p95", 16, 1000, 0),
    ("ITL p95 ms @16", "itl_p95", 16, 1000, 1),
    ("RSS peak MiB (max over levels)", "rss_peak", None, 1 / 2**20, 0),
    # Without file-backed pages (mapped model files: the GGUF, safetensors).
    ("anonymous RSS peak MiB (sampled)", "rss_anon_peak", None, 1 / 2**20, 0),
]


def ratio_rows(levels: list[dict]) -> list[dict]:
    """ours / llama per metric: the median over the rounds (alternations) of
    the per-round ratio, the worst round's ratio and the spread."""
    out = []
    workloads = list(dict.fromkeys(lv["workload"] for lv in levels))
    concurrencies = sorted({lv["concurrency"] for lv in levels})
    rounds = sorted({lv.get("alternation", 0) for lv in levels})
    for workload in workloads:
        for label, key, conc, scale, digits in RATIO_ROWS:
            for c in concurrencies if conc == "all" else [conc]:
                pairs = []
                for round_ in rounds:
                    in_round = [lv for lv in levels if lv.get("alternation", 0) == round_]
                    pair = (_metric(in_round, "ours", workload, key, c), _metric(in_round, "llama", workload, key, c))
                    if pair != (None, None):
                        pairs.append(pair)
                if not pairs:
                    continue
                ours_values = [o for o, _ in pairs if o is not None]
                llama_values = [ll for _, ll in pairs if ll is not None]
                ratios = [o / ll for o, ll in pairs if o is not None and ll]
                target = TARGETS.get((key, c))
                # The worst round is the one furthest from the target's side
                # (without a target: higher is better for throughput, lower for the rest).
                higher_is_better = target.op == ">=" if target else key in ("agg_tok_s", "decode_tok_s")
                worst_of = min if higher_is_better else max
                ratio = statistics.median(ratios) if ratios else None
                worst_ratio = worst_of(ratios) if ratios else None
                met = worst_met = None
                if target:
                    if target.kind == "ratio":
                        met = target.holds(ratio)
                        worst_met = target.holds(worst_ratio, target.worst) if target.worst is not None else None
                    else:
                        met = target.holds(worst_of(ours_values) if ours_values else None)
                out.append(
                    {
                        "workload": workload,
                        "metric": label.format(c=c),
                        "key": key,
                        "concurrency": c,
                        "ours": statistics.median(ours_values) if ours_values else None,
                        "llama": statistics.median(llama_values) if llama_values else None,
                        "ratio": ratio,
                        "ratio_worst": worst_ratio,
                        "ratio_min": min(ratios, default=None),
                        "ratio_max": max(ratios, default=None),
                        "ratios": ratios,
                        "rounds": len(pairs),
                        "scale": scale,
                        "digits": digits,
                        "target": target.text if target else None,
                        "met": met,
                        "worst_met": worst_met,
                    }
                )
    return out


def markdown_ratios(rows: list[dict]) -> str:
    lines = [
        "| workload | metric | ours (median) | llama-server (median) | ours / llama (median) | worst round | spread | rounds | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        verdicts = [v for v in (row["met"], row.get("worst_met")) if v is not None]
        met = "" if not verdicts else ("yes" if all(verdicts) else "**no**")
        spread = f"{_fmt(row.get('ratio_min'), digits=2)}–{_fmt(row.get('ratio_max'), digits=2)}"
        lines.append(
            f"| {row['workload']} | {row['metric']} | {_fmt(row['ours'], row['scale'], row['digits'])} "
            f"| {_fmt(row['llama'], row['scale'], row['digits'])} | {_fmt(row['ratio'], digits=2)} "
            f"| {_fmt(row.get('ratio_worst'), digits=2)} | {spread} | {row.get('rounds', 1)} "
            f"| {row['target'] or ''} | {met} |"
        )
    return "\n".join(lines)


def token_count_table(levels: list[dict]) -> str:
    """Both servers decode greedily until EOS or max_tokens; their answers can
    differ in length, so the token counts each side actually produced are shown."""
    lines = [
        "| workload | C | ours prompt tok | llama prompt tok | ours out tok (min/mean) | llama out tok (min/mean) | ours finish | llama finish |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pairs: dict[tuple[str, int], dict[str, dict]] = {}
    for level in levels:
        # The first round of each level (later rounds produce the same greedy answers).
        pairs.setdefault((level["workload"], level["concurrency"]), {}).setdefault(level["server"], level["summary"])
    for (workload, c), sides in pairs.items():
        ours, llama = sides.get("ours", {}), sides.get("llama", {})
        lines.append(
            f"| {workload} | {c} | {_fmt(ours.get('prompt_tokens_mean'), digits=1)} | {_fmt(llama.get('prompt_tokens_mean'), digits=1)} "
            f"| {_fmt(ours.get('completion_tokens_min'))}/{_fmt(ours.get('completion_tokens_mean'), digits=1)} "
            f"| {_fmt(llama.get('completion_tokens_min'))}/{_fmt(llama.get('completion_tokens_mean'), digits=1)} "
            f"| {ours.get('finish_reasons', '')} | {llama.get('finish_reasons', '')} |"
        )
    return "\n".join(lines)


# The instructions the two servers' int8 products can use: one host's "AMD EPYC"
# had AVX512-VNNI and another's did not, and both servers' speeds depend on it.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def machine_info() -> dict:
    cpu, flags = cpu_info(), cpu_flags()

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    return {
        "hostname": platform.node(),
        "cpu_model": cpu.get("model name", ""),
        "cpu_family_model": f"{cpu.get('cpu family', '?')}/{cpu.get('model', '?')}",
        "cpu_features": [feature for feature in CPU_FEATURES if feature in flags],
        "ncpu": procstat.NCPU,
        "affinity": len(os.sched_getaffinity(0)),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def _others_cores(level: dict) -> float:
    """Cores the rest of the machine kept busy during a level, not counting the
    co-runner that --co-runner put there on purpose."""
    others = level["process"].get("others_cores_mean") or 0.0
    co_runner, wall = level.get("co_runner"), level["process"].get("wall_seconds")
    if co_runner and wall:
        others -= co_runner["cpu_seconds"] / wall
    return max(0.0, others)


def others_cores_now(seconds: float = 2.0) -> float:
    """Cores kept busy by the rest of the machine over the next `seconds` (before any server runs)."""
    busy0, mine0, t0 = procstat.machine_busy_seconds(), procstat.process_cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    busy1, mine1, t1 = procstat.machine_busy_seconds(), procstat.process_cpu_seconds(), time.monotonic()
    return max(0.0, (busy1 - busy0) - (mine1 - mine0)) / (t1 - t0)


# ------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="host:port of a qwen-serve already running (not restarted per level)")
    p.add_argument("--target-pid", type=int, help="its pid, for RSS/CPU (default: found from the listening port)")
    p.add_argument(
        "--model", default=default_model_path(), help="model for the qwen-serve we start (default: %(default)s)"
    )
    p.add_argument("--ours-args", default="", help='extra qwen-serve flags, e.g. "--quantization int8" (appended last)')
    p.add_argument(
        "--compare-llamacpp", action="store_true", help="also run llama-server on the same GGUF, alternating per level"
    )
    p.add_argument(
        "--llama-server",
        type=pathlib.Path,
        help="llama-server binary (default: cached build, see bench/llama_server.py)",
    )
    p.add_argument(
        "--gguf", type=pathlib.Path, default=default_cache_dir() / "gguf" / GGUF_NAME, help="default: %(default)s"
    )
    p.add_argument(
        "--llama-args",
        default="--cache-ram 0",
        help="extra llama-server flags, appended last (default: %(default)r: every prompt is distinct, so its "
        "RAM prompt cache cannot hit and would only grow its RSS with dead entries; pass '' for llama-server's defaults)",
    )
    p.add_argument("--threads", type=int, default=2, help="compute threads for both servers (default: %(default)s)")
    p.add_argument("--concurrency", default="1,4,8,16,32", help="comma-separated stream counts (default: %(default)s)")
    p.add_argument("--workloads", default="short,long", help="short, long or both (default: %(default)s)")
    p.add_argument(
        "--alternations",
        type=int,
        help="measure every level this many times, the servers taking turns in ABBA order; ratios are the median "
        "over them, with the worst round and the spread (default: 5 with --compare-llamacpp, else 1)",
    )
    p.add_argument(
        "--co-runner",
        action="store_true",
        help="run a memory-bandwidth-heavy process (bench/membw.py, one thread) beside each server while it is measured",
    )
    p.add_argument(
        "--co-runner-mib", type=int, default=256, help="the co-runner's buffer size (default: %(default)s MiB)"
    )
    p.add_argument("--rounds", type=int, default=3, help="requests each stream sends per level (default: %(default)s)")
    p.add_argument(
        "--min-requests",
        type=int,
        default=8,
        help="at least this many requests per level: low concurrency gets more rounds (default: %(default)s)",
    )
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens requested, greedy (default: %(default)s)")
    p.add_argument(
        "--long-tokens",
        type=int,
        default=1000,
        help="long prompt size in tokens, chat template included (default: %(default)s)",
    )
    p.add_argument(
        "--ramp",
        type=float,
        default=0.0,
        help="spread the streams' first requests over this many seconds (default: all at once)",
    )
    p.add_argument("--request-timeout", type=float, default=900.0, help="seconds per request (default: %(default)s)")
    p.add_argument(
        "--server-timeout", type=float, default=900.0, help="seconds a server may take to start (default: %(default)s)"
    )
    p.add_argument(
        "--sample-interval", type=float, default=0.25, help="RSS/CPU sampling period in seconds (default: %(default)s)"
    )
    p.add_argument(
        "--noise-threshold",
        type=float,
        default=0.10,
        help="others' mean busy cores above which a level is flagged noisy (default: %(default)s)",
    )
    p.add_argument("--label", help="results file label (default: ours or vs-llamacpp)")
    p.add_argument("--report", type=pathlib.Path, help="print the tables of an earlier results JSON and exit")
    p.add_argument("--out-dir", type=pathlib.Path, default=RESULTS_DIR, help="default: %(default)s")
    args = p.parse_args(argv)
    args.concurrency_levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.alternations is None:
        args.alternations = 5 if args.compare_llamacpp else 1
    if args.alternations < 1:
        p.error("--alternations must be at least 1")
    args.workload_names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.concurrency_levels or min(args.concurrency_levels) < 1:
        p.error("--concurrency needs positive integers")
    if not set(args.workload_names) <= {"short", "long"} or not args.workload_names:
        p.error("--workloads: short, long")
    if args.target and args.target_pid is None and ":" not in args.target:
        p.error("--target must be host:port")
    return args


def turns(sides: Sequence[Any], alternation: int) -> list[Any]:
    """The servers' order in one round: ABBA (ours, llama | llama, ours | ...),
    so a steady drift of the host's speed during a run favours neither side."""
    return list(sides) if alternation % 2 == 0 else list(sides)[::-1]


async def main_async(args: argparse.Namespace) -> dict:
    started = dt.datetime.now(dt.UTC)
    info = machine_info()
    preflight = others_cores_now()
    if preflight > args.noise_threshold:
        log(f"WARNING: the machine is not quiet: {preflight:.2f} cores busy elsewhere before the run")
    sides: list[Any] = [OursServer(args)]
    llama_version = llama_binary = None
    if args.compare_llamacpp:
        from bench import llama_server

        binary = args.llama_server or llama_server.find_binary()
        if binary is None:
            raise SystemExit(
                "llama-server not built: run `python bench/llama_server.py build` (make bench-llamacpp does)"
            )
        if not args.gguf.is_file():
            raise SystemExit(f"GGUF missing at {args.gguf}: run `make model`")
        llama_version, llama_binary = llama_server.version(binary), str(binary)
        sides.append(LlamaServer(args, binary))
        if args.target:
            log("note: --target server keeps running (idle) while llama-server is measured")

    # Prompts are built once, against our server's tokenizer (CountTokens).
    ours = sides[0]
    try:
        ours.start(None)
        counter = ours.client()
        await counter.connect()
        workloads = await build_workloads(args.workload_names, counter, args.long_tokens)
        await counter.close()
    finally:
        if not args.target:
            ours.stop()
    for workload in workloads.values():
        log(f"workload {workload.name}: {workload.description}; prompt tokens {workload.prompt_tokens}")

    levels: list[dict] = []
    for workload in workloads.values():
        for concurrency in args.concurrency_levels:
            per_stream = max(args.rounds, math.ceil(args.min_requests / concurrency))
            ctx = workload.prompt_tokens["max"] + args.max_tokens + CONTEXT_MARGIN
            plan = LevelPlan(workload, concurrency, per_stream, args.max_tokens, ctx)
            for alternation in range(args.alternations):
                for side in turns(sides, alternation):
                    log(
                        f"{workload.name} C={concurrency} round {alternation + 1}/{args.alternations}: "
                        f"starting {side.name} ({per_stream} requests per stream)"
                    )
                    try:
                        side.start(plan)
                        level = await run_level(side, plan, args)
                    finally:
                        if not args.target or side.name != "ours":
                            side.stop()
                    level.update(
                        server=side.name,
                        workload=workload.name,
                        concurrency=concurrency,
                        alternation=alternation,
                        requests_per_stream=per_stream,
                        ctx_per_slot=ctx,
                        server_start_seconds=side.start_seconds,
                        server_argv=side.argv,
                        server_engine=side.engine,
                    )
                    s = level["summary"]
                    level["noisy"] = _others_cores(level) > args.noise_threshold
                    log(
                        f"  {side.name}: {s['requests']} requests, {s['errors']} errors, {_fmt(s['agg_tok_s'], digits=1)} tok/s, "
                        f"TTFT p50 {_fmt(s['ttft_p50'], 1000)} ms, ITL p50 {_fmt(s['itl_p50'], 1000, 1)} ms, "
                        f"others {_fmt(_others_cores(level), digits=2)} cores{_engine_text(side.engine)}"
                        + (f", co-runner {level['co_runner']['gib_per_s']:.1f} GiB/s" if level["co_runner"] else "")
                    )
                    levels.append(level)

    result = {
        "schema": 1,
        "started": started.isoformat(),
        "finished": dt.datetime.now(dt.UTC).isoformat(),
        "machine": info,
        "preflight_others_cores": preflight,
        "config": {
            "concurrency": args.concurrency_levels,
            "workloads": {
                w.name: {"description": w.description, "prompt_tokens": w.prompt_tokens} for w in workloads.values()
            },
            "rounds": args.rounds,
            "min_requests": args.min_requests,
            "max_tokens": args.max_tokens,
            "threads": args.threads,
            "ramp_seconds": args.ramp,
            "target": args.target,
            "model": None if args.target else str(args.model),
            "ours_args": args.ours_args,
            "compare_llamacpp": args.compare_llamacpp,
            "gguf": str(args.gguf) if args.compare_llamacpp else None,
            "llama_args": args.llama_args,
            "llama_server_version": llama_version,
            "llama_server_binary": llama_binary,  # llama-server-no-amx: built without AMX (bench/llama_server.py)
            "noise_threshold_cores": args.noise_threshold,
            "alternations": args.alternations,
            "co_runner_mib": args.co_runner_mib if args.co_runner else None,
        },
        "levels": levels,
        "ratios": ratio_rows(levels) if args.compare_llamacpp else [],
    }
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        result = json.loads(args.report.read_text())
        path = args.report
        args.noise_threshold = result["config"]["noise_threshold_cores"]
        args.compare_llamacpp = result["config"]["compare_llamacpp"]
    else:
        result = asyncio.run(main_async(args))
        args.out_dir.mkdir(parents=True, exist_ok=True)
        label = args.label or ("vs-llamacpp" if args.compare_llamacpp else "ours")
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = args.out_dir / f"{stamp}-{label}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)

    machine = result["machine"]
    features = ", ".join(machine.get("cpu_features", [])) or "not recorded"
    print(f"\n## Load levels ({result['started']}, commit {machine['git_commit'][:10]}; CPU features: {features})\n")
    print(markdown_levels(result["levels"], args.noise_threshold))
    if args.compare_llamacpp:
        print("\n## Tokens actually produced (greedy, both sides stop at EOS or max_tokens)\n")
        print(token_count_table(result["levels"]))
        print(
            f"\n## Ratios, ours / llama-server (same run, median of {result['config'].get('alternations', 1)} rounds)\n"
        )
        print(markdown_ratios(result["ratios"]))
    noisy = [
        f"{lv['workload']}/{lv['server']}/C={lv['concurrency']}/round {lv.get('alternation', 0) + 1}"
        for lv in result["levels"]
        if lv["noisy"]
    ]
    if noisy:
        print(
            f"\n⚠ other processes kept > {args.noise_threshold} cores busy during: {', '.join(noisy)} — rerun on a quiet machine."
        )
    errors = sum(lv["summary"]["errors"] for lv in result["levels"])
    if errors:
        print(f"\n{errors} requests failed; see 'error_examples' in the JSON.")
    print(f"\nresults: {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
