"""gRPC streaming vs HTTP SSE (OpenAI API) against ONE qwen-serve process.

    make bench-protocols                     # the full run (quiet machine!)
    python bench/protocols.py --rounds 2 --concurrency 1 --max-tokens 16   # smoke

What it measures, per protocol, with 1 and 8 concurrent clients, on the same
prompts and greedy decoding (so both protocols stream the same tokens):
  * TTFT: client-side, from just before the request is sent to the first
    non-empty piece of text;
  * full answer: from the same start to the last byte of the stream
    (max_tokens answers, 128 by default);
  * jitter: standard deviation over the rounds of each round's mean (and the
    spread of all samples and of the gaps between pieces, in the JSON);
  * bytes on the wire per answer, both directions, TCP payload (what a
    counting TCP proxy on loopback forwards), on warm connections; the
    bytes a new connection adds are reported apart;
  * CPU: client process (user+sys) and server process, the server split into
    its event-loop thread (transport + request handling) and the rest (the
    engine's compute threads and gRPC's C-core threads);
  * other processes' CPU during every phase: the benchmark is only as good as
    the machine is quiet.

Protocols: grpc (grpc.aio stub, ChatStream), http (the official `openai` SDK,
stream=True with include_usage), http-raw (plain httpx2 + json.loads on the
same SSE stream: the wire without the SDK's per-chunk parsing cost).
Every simulated client has its own connection (its own channel / HTTP client).
Rounds alternate the protocol order so slow drifts of the machine hit both.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import multiprocessing
import os
import pathlib
import platform
import resource
import statistics
import sys
import time
from typing import Any

import psutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from harness import ServerProcess, free_port  # noqa: E402

from service.engine.cpu import cpu_info  # noqa: E402

PROMPTS = [
    "Write a Python class implementing an LRU cache with get and put methods, with docstrings and type hints.",
    "Explain step by step how a binary search works, then implement it in Python with tests.",
    "Write a Go HTTP server that serves a JSON health endpoint and explain each part.",
    "Implement quicksort in Python, explain its complexity and show an example run.",
    "Write a bash script that backs up a directory with timestamps and explain every line.",
    "Write a Python function that parses a CSV file into dictionaries and handles errors, with examples.",
    "Explain the difference between processes and threads, with a Python example of each.",
    "Write a SQL schema for a blog with users, posts and comments, then example queries.",
]
SYSTEM = "You are a helpful coding assistant. Answer in detail."
PROTOCOLS = ("grpc", "http", "http-raw")
# Above this share of the machine used by other processes a run is flagged noisy.
NOISY_SHARE = 0.05


# ------------------------------------------------------------- the proxy


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counters: Any, index: int) -> None:
    try:
        while data := await reader.read(65536):
            with counters.get_lock():
                counters[index] += len(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _proxy_main(routes: list[tuple[int, int]], counters: Any, ready: Any) -> None:
    servers = []
    for slot, (listen_port, upstream_port) in enumerate(routes):

        async def handle(reader, writer, slot=slot, upstream_port=upstream_port):
            with counters.get_lock():
                counters[3 * slot + 2] += 1
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
            await asyncio.gather(
                _pump(reader, up_writer, counters, 3 * slot),  # client -> server
                _pump(up_reader, writer, counters, 3 * slot + 1),  # server -> client
            )

        servers.append(await asyncio.start_server(handle, "127.0.0.1", listen_port))
    ready.set()
    await asyncio.Event().wait()


def _proxy_process(routes: list[tuple[int, int]], counters: Any, ready: Any) -> None:
    asyncio.run(_proxy_main(routes, counters, ready))


class CountingProxy:
    """A TCP proxy in its own process (its CPU is not the client's) that
    counts the payload bytes it forwards, per route and direction."""

    def __init__(self, upstream_ports: dict[str, int]) -> None:
        self.names = list(upstream_ports)
        self.ports = {name: free_port() for name in self.names}
        ctx = multiprocessing.get_context("spawn")
        self._counters = ctx.Array("Q", 3 * len(self.names))
        ready = ctx.Event()
        routes = [(self.ports[name], upstream_ports[name]) for name in self.names]
        self.process = ctx.Process(target=_proxy_process, args=(routes, self._counters, ready), daemon=True)
        self.process.start()
        if not ready.wait(30):
            raise RuntimeError("proxy did not start")

    def read(self, name: str) -> tuple[int, int, int]:
        """(bytes client->server, bytes server->client, connections) so far."""
        slot = self.names.index(name)
        with self._counters.get_lock():
            return tuple(self._counters[3 * slot : 3 * slot + 3])  # type: ignore[return-value]

    def close(self) -> None:
        self.process.terminate()
        self.process.join(5)


# ------------------------------------------------------------ the clients


@dataclasses.dataclass
class Sample:
    ttft: float
    total: float
    completion_tokens: int
    pieces: int
    gaps: list[float]
    text: str


class GrpcClient:
    def __init__(self, target: str, max_tokens: int) -> None:
        from grpc import aio

        from qwen_grpc_client.pb.qwen import qwen_service_pb2 as pb
        from qwen_grpc_client.pb.qwen import qwen_service_pb2_grpc as pb_grpc

        self._pb = pb
        self._channel = aio.insecure_channel(target)
        self._stub = pb_grpc.QwenServiceStub(self._channel)
        self._max_tokens = max_tokens

    async def ask(self, prompt: str) -> Sample:
        pb = self._pb
        request = pb.ChatRequest(
            messages=[pb.Message(role="system", content=SYSTEM), pb.Message(role="user", content=prompt)],
            max_tokens=self._max_tokens,
            temperature=0.0,
        )
        started = time.perf_counter()
        first = last = None
        gaps: list[float] = []
        pieces: list[str] = []
        tokens = 0
        async for message in self._stub.ChatStream(request, timeout=600):
            now = time.perf_counter()
            if message.content:
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                pieces.append(message.content)
            if message.is_final:
                tokens = message.usage.completion_tokens
        done = time.perf_counter()
        return Sample(first - started, done - started, tokens, len(pieces), gaps, "".join(pieces))

    async def close(self) -> None:
        await self._channel.close()


class OpenAIClient:
    def __init__(self, base_url: str, max_tokens: int) -> None:
        import openai

        self._client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=600)
        self._max_tokens = max_tokens

    async def ask(self, prompt: str) -> Sample:
        started = time.perf_counter()
        first = last = None
        gaps: list[float] = []
        pieces: list[str] = []
        tokens = 0
        stream = await self._client.chat.completions.create(
            model="",
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
            max_tokens=self._max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        done = time.perf_counter()
        return Sample(first - started, done - started, tokens, len(pieces), gaps, "".join(pieces))

    async def close(self) -> None:
        await self._client.close()


class RawSSEClient:
    def __init__(self, base_url: str, max_tokens: int) -> None:
        import httpx2

        self._client = httpx2.AsyncClient(base_url=base_url, timeout=600)
        self._max_tokens = max_tokens

    async def ask(self, prompt: str) -> Sample:
        body = {
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
            "max_tokens": self._max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started = time.perf_counter()
        first = last = None
        gaps: list[float] = []
        pieces: list[str] = []
        tokens = 0
        async with self._client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                choices = chunk["choices"]
                if choices and choices[0]["delta"].get("content"):
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
                    pieces.append(choices[0]["delta"]["content"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        done = time.perf_counter()
        return Sample(first - started, done - started, tokens, len(pieces), gaps, "".join(pieces))

    async def close(self) -> None:
        await self._client.aclose()


def make_client(protocol: str, grpc_target: str, http_url: str, max_tokens: int):
    if protocol == "grpc":
        return GrpcClient(grpc_target, max_tokens)
    if protocol == "http":
        return OpenAIClient(http_url, max_tokens)
    return RawSSEClient(http_url, max_tokens)


# --------------------------------------------------------------- CPU time


def _cpu_seconds(stat_line: str) -> float:
    fields = stat_line.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of the server: its event-loop (main) thread and the rest."""
    loop = other = 0.0
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            seconds = _cpu_seconds((task / "stat").read_text())
        except FileNotFoundError:
            continue
        if int(task.name) == pid:
            loop += seconds
        else:
            other += seconds
    return {"event_loop_thread": loop, "other_threads": other, "total": loop + other}


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class OthersCPU:
    """CPU used by every process that is not part of the benchmark."""

    def __init__(self, own_pids: set[int]) -> None:
        self._own = own_pids
        self._start = self._snapshot()
        self._wall = time.monotonic()

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        out = {}
        for proc in psutil.process_iter(["pid", "name", "cpu_times"]):
            info = proc.info
            if info["pid"] in self._own or info["cpu_times"] is None:
                continue
            out[info["pid"]] = (info["name"], info["cpu_times"].user + info["cpu_times"].system)
        return out

    def result(self) -> dict[str, Any]:
        end = self._snapshot()
        wall = time.monotonic() - self._wall
        per: dict[str, float] = {}
        for pid, (name, seconds) in end.items():
            delta = seconds - self._start.get(pid, (name, 0.0))[1]
            if delta > 0:
                per[name] = per.get(name, 0.0) + delta
        total = sum(per.values())
        top = sorted(per.items(), key=lambda kv: -kv[1])[:5]
        return {
            "cpu_seconds": round(total, 3),
            "wall_seconds": round(wall, 3),
            "share_of_machine": round(total / (wall * psutil.cpu_count()), 4) if wall else 0.0,
            "top": {name: round(seconds, 3) for name, seconds in top},
        }


# ------------------------------------------------------------ the phases


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "mean": statistics.fmean(values),
        "p50": statistics.median(values),
        "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


async def run_latency(args, server: ServerProcess, concurrency: int) -> dict[str, Any]:
    protocols = args.protocols
    clients = {
        p: [make_client(p, server.target, server.http_url, args.max_tokens) for _ in range(concurrency)]
        for p in protocols
    }
    # Warm every connection (and the server's per-shape code paths) first.
    for p in protocols:
        await asyncio.gather(*(c.ask(PROMPTS[i % len(PROMPTS)]) for i, c in enumerate(clients[p])))
    samples: dict[str, list[list[Sample]]] = {p: [] for p in protocols}
    cpu = {
        p: {"client": 0.0, "server": {"event_loop_thread": 0.0, "other_threads": 0.0, "total": 0.0}} for p in protocols
    }
    others = {p: [] for p in protocols}
    for round_index in range(args.rounds):
        order = protocols if round_index % 2 == 0 else protocols[::-1]
        for p in order:
            prompts = [PROMPTS[(round_index + i) % len(PROMPTS)] for i in range(concurrency)]
            watcher = OthersCPU({os.getpid(), server.process.pid})
            client_before, server_before = client_cpu(), server_cpu(server.process.pid)
            results = await asyncio.gather(*(c.ask(q) for c, q in zip(clients[p], prompts)))
            client_after, server_after = client_cpu(), server_cpu(server.process.pid)
            others[p].append(watcher.result())
            samples[p].append(list(results))
            cpu[p]["client"] += client_after - client_before
            for key in server_after:
                cpu[p]["server"][key] += server_after[key] - server_before[key]
            print(
                f"  c={concurrency} round {round_index + 1}/{args.rounds} {p:8s} "
                f"ttft {statistics.fmean(s.ttft for s in results) * 1000:7.1f} ms  "
                f"total {statistics.fmean(s.total for s in results) * 1000:8.1f} ms  "
                f"others' CPU {others[p][-1]['share_of_machine'] * 100:4.1f}%",
                flush=True,
            )
    for p in protocols:
        for c in clients[p]:
            await c.close()
    out: dict[str, Any] = {}
    for p in protocols:
        flat = [s for rnd in samples[p] for s in rnd]
        answers = len(flat)
        round_ttft = [statistics.fmean(s.ttft for s in rnd) for rnd in samples[p]]
        round_total = [statistics.fmean(s.total for s in rnd) for rnd in samples[p]]
        gaps = [g for s in flat for g in s.gaps]
        out[p] = {
            "answers": answers,
            "completion_tokens": sorted({s.completion_tokens for s in flat}),
            "short_answers": sum(1 for s in flat if s.completion_tokens != args.max_tokens),
            "ttft_s": {
                **_summary([s.ttft for s in flat]),
                "jitter_rounds": statistics.stdev(round_ttft) if len(round_ttft) > 1 else 0.0,
                "rounds": round_ttft,
            },
            "total_s": {
                **_summary([s.total for s in flat]),
                "jitter_rounds": statistics.stdev(round_total) if len(round_total) > 1 else 0.0,
                "rounds": round_total,
            },
            "gap_s": _summary(gaps) if len(gaps) > 1 else None,
            "pieces_per_answer": statistics.fmean(s.pieces for s in flat),
            "cpu_s_per_answer": {
                "client": cpu[p]["client"] / answers,
                "server_total": cpu[p]["server"]["total"] / answers,
                "server_event_loop_thread": cpu[p]["server"]["event_loop_thread"] / answers,
                "server_other_threads": cpu[p]["server"]["other_threads"] / answers,
            },
            "others_cpu": others[p],
        }
    return out


async def run_bytes(args, server: ServerProcess) -> dict[str, Any]:
    """Sequential answers through the counting proxy: bytes per answer on a
    warm connection, and what the first answer on a new connection adds."""
    wire_protocols = [p for p in args.protocols if p != "http-raw"] or list(args.protocols)
    proxy = CountingProxy({"grpc": server.grpc_port, "http": server.http_port})
    out: dict[str, Any] = {}
    texts: dict[str, list[str]] = {}
    try:
        for p in wire_protocols:
            route = "grpc" if p == "grpc" else "http"
            client = make_client(
                p, f"127.0.0.1:{proxy.ports['grpc']}", f"http://127.0.0.1:{proxy.ports['http']}", args.max_tokens
            )
            per_answer = []
            texts[p] = []
            for _ in range(args.bytes_answers + 1):
                up0, down0, _ = proxy.read(route)
                # One prompt, greedy: every answer is the same, so the first
                # answer's surplus is the new connection's cost alone.
                sample = await client.ask(PROMPTS[0])
                await asyncio.sleep(0.3)  # let trailing frames (acks, pings) through
                up1, down1, conns = proxy.read(route)
                per_answer.append(
                    {
                        "up": up1 - up0,
                        "down": down1 - down0,
                        "completion_tokens": sample.completion_tokens,
                        "text_bytes": len(sample.text.encode()),
                        "pieces": sample.pieces,
                    }
                )
                texts[p].append(sample.text)
            await client.close()
            await asyncio.sleep(0.3)
            first, warm = per_answer[0], per_answer[1:]
            total = [a["up"] + a["down"] for a in warm]
            per_token = [(a["up"] + a["down"]) / a["completion_tokens"] for a in warm]
            out[p] = {
                "answers": warm,
                "bytes_per_answer": statistics.fmean(total),
                "bytes_per_128_tokens": statistics.fmean(per_token) * 128,
                "request_bytes": statistics.fmean(a["up"] for a in warm),
                "response_bytes": statistics.fmean(a["down"] for a in warm),
                "text_bytes_per_answer": statistics.fmean(a["text_bytes"] for a in warm),
                "new_connection_extra_bytes": (first["up"] + first["down"]) - statistics.fmean(total),
                "connections": proxy.read(route)[2],
            }
    finally:
        proxy.close()
    if len(texts) > 1:
        reference = next(iter(texts.values()))
        out["same_answers_across_protocols"] = all(t == reference for t in texts.values())
    return out


# ---------------------------------------------------------------- report


def _ms(value: float) -> str:
    return f"{value * 1000:.1f}"


def markdown(results: dict[str, Any]) -> str:
    protocols = results["config"]["protocols"]
    lines = [
        f"# gRPC vs HTTP SSE — {results['started']}",
        "",
        f"Model `{results['config']['model_name']}`, {results['config']['max_tokens']}-token greedy answers, "
        + (f"{results['config']['rounds']} rounds" if results["latency"] else "bytes only")
        + f"; machine: {results['machine']['cpus']} CPUs, {results['machine']['cpu_model']}.",
        f"Other processes used {results['others_cpu_share_max'] * 100:.1f}% of the machine in the noisiest phase "
        f"(mean {results['others_cpu_share_mean'] * 100:.1f}%).",
        "",
    ]
    if results["others_cpu_share_max"] > NOISY_SHARE:
        lines += [
            f"> **Noisy run**: other processes used more than {NOISY_SHARE * 100:.0f}% of the machine in some phase; "
            "timing and CPU figures below are not a fair comparison. Bytes on the wire do not depend on load.",
            "",
        ]
    for key, latency in results["latency"].items():
        concurrency = key.removeprefix("c")
        lines += [f"## {concurrency} concurrent client{'s' if concurrency != '1' else ''}", ""]
        lines.append("| metric | " + " | ".join(protocols) + " |")
        lines.append("|---|" + "---|" * len(protocols))
        rows = [
            ("TTFT mean (ms)", lambda r: _ms(r["ttft_s"]["mean"])),
            ("TTFT p95 (ms)", lambda r: _ms(r["ttft_s"]["p95"])),
            ("TTFT jitter: stdev of round means (ms)", lambda r: _ms(r["ttft_s"]["jitter_rounds"])),
            ("full answer mean (ms)", lambda r: _ms(r["total_s"]["mean"])),
            ("full answer jitter: stdev of round means (ms)", lambda r: _ms(r["total_s"]["jitter_rounds"])),
            ("gap between pieces: stdev (ms)", lambda r: _ms(r["gap_s"]["stdev"]) if r["gap_s"] else "-"),
            ("client CPU per answer (ms)", lambda r: _ms(r["cpu_s_per_answer"]["client"])),
            ("server CPU per answer (ms)", lambda r: _ms(r["cpu_s_per_answer"]["server_total"])),
            ("  of which event-loop thread (ms)", lambda r: _ms(r["cpu_s_per_answer"]["server_event_loop_thread"])),
            (
                "others' CPU share, max over rounds",
                lambda r: f"{max(o['share_of_machine'] for o in r['others_cpu']) * 100:.1f}%",
            ),
            ("answers (short of max_tokens)", lambda r: f"{r['answers']} ({r['short_answers']})"),
        ]
        for name, cell in rows:
            lines.append(f"| {name} | " + " | ".join(cell(latency[p]) for p in protocols) + " |")
        lines.append("")
    wire = results.get("bytes")
    if wire:
        wire_protocols = [p for p in protocols if p in wire]
        lines += ["## Bytes on the wire (TCP payload, both directions, warm connection)", ""]
        lines.append("| metric | " + " | ".join(wire_protocols) + " |")
        lines.append("|---|" + "---|" * len(wire_protocols))
        for name, key in [
            ("per answer", "bytes_per_answer"),
            (f"per {results['config']['max_tokens']}-token answer, normalised to 128 tokens", "bytes_per_128_tokens"),
            ("request (client -> server)", "request_bytes"),
            ("response (server -> client)", "response_bytes"),
            ("answer text itself (UTF-8)", "text_bytes_per_answer"),
            ("extra for a new connection", "new_connection_extra_bytes"),
        ]:
            lines.append(f"| {name} | " + " | ".join(f"{wire[p][key]:.0f}" for p in wire_protocols) + " |")
        if "same_answers_across_protocols" in wire:
            lines += ["", f"Same answer text over every protocol: {wire['same_answers_across_protocols']}."]
        lines.append("")
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_info().get("model name", "unknown"),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


async def amain(args) -> int:
    from service.config import default_model_path

    model = args.model or default_model_path()
    server_args = ["--max-batch-size", str(max(16, *args.concurrency, 1)), *args.server_arg]
    results: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(sys.argv),
        "machine": _machine(),
        "config": {
            "model": str(model),
            "model_name": pathlib.Path(model).name,
            "protocols": list(args.protocols),
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "bytes_answers": args.bytes_answers,
            "server_args": server_args,
        },
        "latency": {},
    }
    server = ServerProcess(model, *server_args)
    try:
        server.wait_serving(timeout=600)
        print(f"server pid {server.process.pid}: gRPC {server.target}, HTTP {server.http_url}", flush=True)
        for concurrency in args.concurrency:
            results["latency"][f"c{concurrency}"] = await run_latency(args, server, concurrency)
        if args.bytes_answers > 0:
            print("  bytes on the wire (through the counting proxy) ...", flush=True)
            watcher = OthersCPU({os.getpid(), server.process.pid})
            results["bytes"] = await run_bytes(args, server)
            results["bytes"]["others_cpu"] = watcher.result()
    finally:
        server.close()
    shares = [
        o["share_of_machine"] for lat in results["latency"].values() for r in lat.values() for o in r["others_cpu"]
    ]
    if "bytes" in results:
        shares.append(results["bytes"]["others_cpu"]["share_of_machine"])
    results["others_cpu_share_max"] = max(shares)
    results["others_cpu_share_mean"] = statistics.fmean(shares)
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"protocols-{results['started'].replace(':', '').replace('-', '')}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {stem}.json and {stem}.md")
    if results["others_cpu_share_max"] > NOISY_SHARE:
        print(
            f"WARNING: other processes used up to {results['others_cpu_share_max'] * 100:.0f}% of the machine: "
            "these numbers are noisy; rerun on a quiet machine."
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the one `make model` fetches)")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated subset of grpc,http,http-raw")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated client counts ('' = bytes only)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--bytes-answers", type=int, default=3, help="warm answers per protocol through the proxy (0: skip)"
    )
    parser.add_argument("--server-arg", action="append", default=[], help="extra qwen-serve flag (repeatable)")
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--render", metavar="JSON", help="only re-render the markdown table of an earlier run's JSON")
    args = parser.parse_args()
    if args.render:
        path = pathlib.Path(args.render)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        print(f"wrote {path.with_suffix('.md')}")
        return 0
    args.protocols = tuple(p for p in args.protocols.split(",") if p)
    if unknown := set(args.protocols) - set(PROTOCOLS):
        parser.error(f"unknown protocols: {unknown}")
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]  # empty: bytes only
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (jitter is a standard deviation over rounds)")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
