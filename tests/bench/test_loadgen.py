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
from service.engine.config import QUANTIZATIONS  # noqa: E402

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-results")
    argv = [
        sys.executable,
        str(REPO_ROOT / "bench" / "loadgen.py"),
        "--model",
        str(tiny_model_dir),
        "--concurrency",
        "1,2",
        "--rounds",
        "1",
        "--min-requests",
        "2",
        "--workloads",
        "short,long",
        "--long-tokens",
        "400",
        "--max-tokens",
        str(MAX_TOKENS),
        "--threads",
        "1",
        "--out-dir",
        str(out),
        "--label",
        "tiny",
    ]
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
        engine = level["server_engine"]  # its qwen_engine_info, read once it served
        assert engine["requested_quantization"] == "auto" and engine["quantization"] in set(QUANTIZATIONS) - {"auto"}
        assert engine["native_layers"] in ("true", "false")


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
            for part in (
                b'data: {"n": 1}\n\nda',
                b'ta: {"n": 2}\n',
                b"\n: ping\n\n",
                b'data: {"n": 3}\r\n\r\ndata: [DONE]\n\n',
            ):
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
    assert by_metric["aggregate tok/s @16"]["rounds"] == 1  # levels without an alternation are one round
    assert by_metric["TTFT p95 ms @16"]["ratio"] == pytest.approx(0.5) and by_metric["TTFT p95 ms @16"]["met"] is False
    assert by_metric["ITL p95 ms @16"]["met"] is True  # absolute: ours 50 ms <= 100 ms
    assert by_metric["RSS peak MiB (max over levels)"]["met"] is True  # 1.5 GB <= 1.6 GB


def _level(server, c, agg, ttft95, rss, alternation=0, decode=None):
    summary = {"agg_tok_s": agg, "ttft_p95": ttft95, "ttft_p50": None, "itl_p95": 0.05, "decode_tok_s_median": decode}
    process = {"server_rss_peak_bytes": rss, "server_rss_anon_peak_sampled_bytes": rss // 2}
    return {
        "server": server,
        "workload": "short",
        "concurrency": c,
        "alternation": alternation,
        "summary": summary,
        "process": process,
    }


def test_ratio_rows_take_the_median_round_and_report_the_worst():
    from bench.loadgen import ratio_rows

    # Five rounds of single-stream decode: ratios 1.5, 1.4, 1.05, 1.35, 1.32.
    levels = []
    for alternation, (ours, llama) in enumerate([(75, 50), (70, 50), (63, 60), (67.5, 50), (66, 50)]):
        levels += [
            _level("ours", 1, ours, 0.1, 1_000_000_000, alternation, decode=ours),
            _level("llama", 1, llama, 0.2, 800_000_000, alternation, decode=llama),
        ]
    by_metric = {row["metric"]: row for row in ratio_rows(levels)}
    decode = by_metric["single-stream decode tok/s"]
    assert decode["rounds"] == 5
    assert decode["ratio"] == pytest.approx(1.35)  # the median round
    assert decode["ratio_worst"] == pytest.approx(1.05) and decode["ratio_min"] == pytest.approx(1.05)
    assert decode["ratio_max"] == pytest.approx(1.5)
    assert decode["ours"] == pytest.approx(67.5) and decode["llama"] == pytest.approx(50)
    assert decode["met"] is True and decode["worst_met"] is False  # median >= 1.3x, worst round < 1.1x
    # Lower is better for TTFT: its worst round is the highest ratio (0.1/0.2 in every round here).
    ttft = by_metric["single-stream TTFT p50 ms"] if "single-stream TTFT p50 ms" in by_metric else None
    assert ttft is None  # ttft_p50 is None on both sides: no row
    # An absolute bound holds for our worst round, not the median.
    rss = by_metric["RSS peak MiB (max over levels)"]
    assert rss["met"] is True
    levels[0]["process"]["server_rss_peak_bytes"] = 1_700_000_000
    assert {row["metric"]: row for row in ratio_rows(levels)}["RSS peak MiB (max over levels)"]["met"] is False


def test_servers_take_turns_in_abba_order():
    from bench.loadgen import turns

    assert [turns(["ours", "llama"], r) for r in range(4)] == [
        ["ours", "llama"],
        ["llama", "ours"],
        ["ours", "llama"],
        ["llama", "ours"],
    ]


def test_alternations_and_co_runner_are_recorded(tiny_model_dir, tmp_path):
    """Two rounds of one level with the memory-bandwidth co-runner beside the
    server: both rounds are recorded, each with the bandwidth the co-runner got."""
    argv = [
        sys.executable,
        str(REPO_ROOT / "bench" / "loadgen.py"),
        "--model",
        str(tiny_model_dir),
        "--concurrency",
        "1",
        "--workloads",
        "short",
        "--rounds",
        "1",
        "--min-requests",
        "1",
        "--max-tokens",
        "4",
        "--threads",
        "1",
        "--alternations",
        "2",
        "--co-runner",
        "--co-runner-mib",
        "8",
        "--out-dir",
        str(tmp_path),
        "--label",
        "alt",
    ]
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = tmp_path.glob("*-alt.json")
    result = json.loads(path.read_text())
    assert result["config"]["alternations"] == 2 and result["config"]["co_runner_mib"] == 8
    assert [lv["alternation"] for lv in result["levels"]] == [0, 1]
    for level in result["levels"]:
        assert level["summary"]["errors"] == 0
        co_runner = level["co_runner"]
        assert co_runner["gib_per_s"] > 0 and co_runner["cpu_seconds"] > 0 and co_runner["mib"] == 8
    assert "| C | round |" in proc.stdout and "co-runner GiB/s" in proc.stdout
