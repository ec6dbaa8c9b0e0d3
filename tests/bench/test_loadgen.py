"""The load generator, for real, against tiny-model servers it starts itself.
Not a timed test: it checks that the tooling measures and records sane
things, never how fast anything is."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from harness import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))

from bench.loadgen import RequestResult, percentile  # noqa: E402
from bench.sse_client import HttpConnection, HttpError  # noqa: E402

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-results")
    argv = [
        sys.executable, str(REPO_ROOT / "bench" / "loadgen.py"),
        "--model", str(tiny_model_dir),
        "--concurrency", "1,2", "--rounds", "1", "--min-requests", "2",
        "--workloads", "short,long", "--long-tokens", "400",
        "--max-tokens", str(MAX_TOKENS), "--threads", "1",
        "--out-dir", str(out), "--label", "tiny",
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = list(out.glob("*-tiny.json"))
    assert len(files) == 1, files
    return proc.stdout, json.loads(files[0].read_text())


def test_every_level_ran_the_planned_requests_without_errors(run):
    _, result = run
    levels = [(lv["workload"], lv["server"], lv["concurrency"]) for lv in result["levels"]]
    assert levels == [("short", "ours", 1), ("short", "ours", 2), ("long", "ours", 1), ("long", "ours", 2)]
    for level in result["levels"]:
        assert level["summary"]["requests"] == 2
        assert level["summary"]["errors"] == 0
        assert len(level["requests"]) == 2
        argv = level["server_argv"]
        assert argv[argv.index("--max-batch-size") + 1] == str(level["concurrency"])


def test_request_records_are_consistent(run):
    _, result = run
    prompts = result["config"]["workloads"]
    for level in result["levels"]:
        numbers = [r["request_number"] for r in level["requests"]]
        assert len(set(numbers)) == len(numbers)  # a distinct prompt per request
        for r in level["requests"]:
            assert r["ok"] and r["error"] is None
            assert 1 <= r["completion_tokens"] <= MAX_TOKENS
            assert r["finish_reason"] in ("stop", "length")
            bounds = prompts[level["workload"]]["prompt_tokens"]
            assert bounds["min"] - 5 <= r["prompt_tokens"] <= bounds["max"] + 5
            assert r["pieces"] >= 1 and len(r["gaps_ms"]) == r["pieces"] - 1
            assert 0 < r["ttft"] <= r["total"]
            assert all(g >= 0 for g in r["gaps_ms"])
            assert sum(r["gaps_ms"]) / 1000 <= r["total"] - r["ttft"] + 1e-6


def test_level_summary_and_process_figures_are_sane(run):
    _, result = run
    long_tokens = result["config"]["workloads"]["long"]["prompt_tokens"]
    assert 300 <= long_tokens["min"] <= 400 <= long_tokens["max"] + 80  # trimmed to the token target via CountTokens
    for level in result["levels"]:
        s, p = level["summary"], level["process"]
        assert s["completion_tokens"] == sum(r["completion_tokens"] for r in level["requests"])
        assert s["agg_tok_s"] > 0 and level["wall_seconds"] > 0
        assert 0 < s["ttft_p50"] <= s["ttft_p95"] <= s["ttft_max"]
        if s["itl_p50"] is not None:
            assert 0 <= s["itl_p50"] <= s["itl_p95"]
        assert p["server_rss_peak_bytes"] > 10 * 2**20
        assert p["server_rss_peak_bytes"] >= p["server_rss_start_bytes"] > 0
        assert p["server_cpu_seconds"] >= 0 and p["loadgen_cpu_seconds"] >= 0
        assert p["others_cpu_seconds"] >= 0 and p["others_cores_mean"] >= 0
        assert isinstance(level["noisy"], bool)
    assert result["ratios"] == []  # no llama-server in this run


def test_markdown_table_is_printed(run):
    stdout, result = run
    assert "| workload | server | C |" in stdout
    assert stdout.count("| ours |") == len(result["levels"])


def test_itl_accounts_for_pieces_carrying_several_tokens():
    r = RequestResult(stream=0, round=0, request_number=1, started=0.0, ok=True, completion_tokens=9)
    r.gaps = [0.02, 0.04, 0.02, 0.04]  # 5 pieces for 9 tokens: 8 tokens arrive in 4 gaps
    values, weights = r.itl_samples()
    assert values == pytest.approx([0.01, 0.02, 0.01, 0.02]) and weights == [2.0] * 4
    assert r.decode_tok_s == pytest.approx(8 / 0.12)
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([1, 2, 3, 4], 95) == 4
    assert percentile([1, 10], 50, weights=[3, 1]) == 1 and percentile([1, 10], 95, weights=[3, 1]) == 10


async def test_sse_client_reads_chunked_events_and_reuses_the_connection():
    """The client's HTTP/1.1 side against a minimal local server: events split
    across chunks, CRLF events, keep-alive for the second request, errors."""
    connections = 0

    async def handle(reader, writer):
        nonlocal connections
        connections += 1
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
            body = json.loads(await reader.readexactly(length))
            if body.get("fail"):
                payload = b'{"error": "bad"}'
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for part in (b'data: {"n": 1}\n\nda', b'ta: {"n": 2}\n', b"\n: ping\n\n", b'data: {"n": 3}\r\n\r\ndata: [DONE]\n\n'):
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
                await asyncio.sleep(0.001)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = HttpConnection("127.0.0.1", port)
    try:
        for _ in range(2):
            events = [data async for data in client.post_sse("/v1/chat/completions", {"x": 1})]
            assert events == ['{"n": 1}', '{"n": 2}', '{"n": 3}', "[DONE]"]
        with pytest.raises(HttpError) as error:
            async for _ in client.post_sse("/v1/chat/completions", {"fail": True}):
                pass
        assert error.value.status == 400
        assert connections == 1
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


def test_ratio_rows_divide_ours_by_llama_and_check_issue_targets():
    from bench.loadgen import ratio_rows

    def level(server, c, agg, ttft95, rss):
        summary = {"agg_tok_s": agg, "ttft_p95": ttft95, "ttft_p50": None, "itl_p95": 0.05, "decode_tok_s_median": None}
        process = {"server_rss_peak_bytes": rss, "server_rss_anon_peak_sampled_bytes": rss // 2}
        return {"server": server, "workload": "short", "concurrency": c, "summary": summary, "process": process}

    rows = ratio_rows([level("ours", 16, 300.0, 0.5, 1_500_000_000), level("llama", 16, 100.0, 1.0, 800_000_000)])
    by_metric = {row["metric"]: row for row in rows}
    assert by_metric["aggregate tok/s @16"]["ratio"] == pytest.approx(3.0) and by_metric["aggregate tok/s @16"]["met"]
    assert by_metric["TTFT p95 ms @16"]["ratio"] == pytest.approx(0.5) and by_metric["TTFT p95 ms @16"]["met"] is False
    assert by_metric["ITL p95 ms @16"]["met"] is True  # absolute: ours 50 ms <= 100 ms
    assert by_metric["RSS peak MiB (max over levels)"]["met"] is True  # 1.5 GB <= 1.6 GB
