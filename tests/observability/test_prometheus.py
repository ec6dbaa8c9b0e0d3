"""A real Prometheus scrapes a real server (tiny model) while known traffic
runs; every check goes through Prometheus' HTTP API. The dashboard's queries
and the alert rules are evaluated on the same data."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request

import grpc
import pytest
from harness import REPO_ROOT, running_server
from prometheus_server import PrometheusServer, require_binary

from qwen_grpc_client import QwenClient, build_request

ALERT_RULES = REPO_ROOT / "deploy" / "prometheus" / "qwen-grpc-alerts.yaml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "qwen-grpc-dashboard.json"
JOB, NAMESPACE, POD = "qwen-grpc", "test", "qwen-grpc-0"
# Limits small enough to fill: 2 running + 1 waiting, the 4th call is refused.
SERVER_FLAGS = (
    "--max-batch-size",
    "2",
    "--max-waiting",
    "1",
    "--max-model-len",
    "16384",
    "--max-tokens-limit",
    "16000",
    "--threads",
    "1",
)
LONG = {"max_tokens": 16000, "temperature": 0.0}  # far longer than any check takes


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read().decode()


def _server_sample(url: str, name: str) -> float:
    """One unlabelled-but-for-model sample straight from the server's /metrics."""
    match = re.search(rf"^{name}{{[^}}]*}} (\S+)$", _scrape(url), re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def _wait_server(url: str, name: str, value: float, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while _server_sample(url, name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, *SERVER_FLAGS) as process:
        yield process


@pytest.fixture(scope="module")
def prometheus(server):
    prom = PrometheusServer(
        [f"127.0.0.1:{server.metrics_port}"],
        job=JOB,
        labels={"namespace": NAMESPACE, "pod": POD},
        rule_files=[ALERT_RULES],
    )
    try:
        prom.wait_ready()
        prom.wait_for('up{job="qwen-grpc"} == 1')  # the first scrape took place
        yield prom
    finally:
        prom.close()


@pytest.fixture(scope="module")
def traffic(server, prometheus):
    """Known traffic in two phases. Phase 1: 3 unary chats and 2 streams that
    complete, 1 invalid request, then a burst that fills the server: A and B
    take both slots, C waits (and completes once A is cancelled), D is refused,
    B is cancelled. Phase 2: a call whose deadline passes mid-generation.
    Returns what the client saw, and `phase1_at`: a time at which Prometheus
    had scraped all of phase 1 and nothing of phase 2."""
    client = QwenClient(server.target)
    seen: dict = {"completed": []}

    def completed_stream(call) -> int:
        messages = list(call)
        final = messages[-1]
        assert final.is_final
        seen["completed"].append((final.usage.prompt_tokens, final.usage.completion_tokens))
        return len(messages)

    for i in range(3):
        result = client.chat(_user(f"Count to {i + 3}."), max_tokens=8, temperature=0.0)
        seen["completed"].append((result.prompt_tokens, result.completion_tokens))
    for i in range(2):
        completed_stream(client.stream(_user(f"Write {i + 2} words."), max_tokens=16, temperature=0.0))
    with pytest.raises(grpc.RpcError) as invalid:
        client.chat(_user("   "))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    stub = client._stub
    long_prompts = [_user(f"Tell a long story number {i}.") for i in range(2)]
    seen["burst_prompt_tokens"] = sum(client.count_tokens(messages) for messages in long_prompts)
    a, b = (stub.ChatStream(build_request(messages, **LONG)) for messages in long_prompts)
    next(a), next(b)  # both are decoding
    c = stub.ChatStream(build_request(_user("Short answer, please."), max_tokens=8, temperature=0.0))
    _wait_server(server.metrics_url, "qwen_requests_waiting", 1)
    queued_at = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        next(stub.ChatStream(build_request(_user("One more?"), **LONG)))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Hold the burst until Prometheus has seen it and C has waited > 0.5 s.
    prometheus.wait_for("qwen_requests_waiting == 1 and on() qwen_requests_running == 2")
    time.sleep(max(0.0, 0.6 - (time.monotonic() - queued_at)))
    a.cancel()  # frees a slot: C runs to completion
    seen["c_messages"] = completed_stream(c)
    b.cancel()
    seen["phase1_at"] = prometheus.wait_for(
        'sum(qwen_requests_failed_total{reason="cancelled"}) == 2 and on() sum(qwen_requests_running) == 0'
    )

    with pytest.raises(grpc.RpcError) as late:
        client.chat(_user("Write a very long essay."), timeout=0.5, **LONG)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    prometheus.wait_for('sum(qwen_requests_failed_total{reason="deadline"}) == 1')
    prometheus.wait_for('sum(grpc_server_handled_total{grpc_code="DeadlineExceeded"}) == 1')
    client.close()
    return seen


def test_exposition_passes_promtool(server, traffic):
    promtool = require_binary("promtool")
    text = _scrape(server.metrics_url)
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "_created" not in text  # disabled: they would double the series count


def test_request_outcomes(prometheus, traffic):
    at = traffic["phase1_at"]
    finished = prometheus.values("sum by (finish_reason) (qwen_requests_finished_total)", "finish_reason", at)
    assert sum(finished.values()) == 6, finished
    failed = prometheus.values("sum by (reason) (qwen_requests_failed_total)", "reason", at)
    assert failed == {"validation": 1, "overloaded": 1, "cancelled": 2, "deadline": 0, "unavailable": 0, "internal": 0}
    assert prometheus.value('sum(qwen_requests_failed_total{reason="deadline"})') == 1


def test_token_counters_match_what_clients_received(prometheus, traffic):
    at = traffic["phase1_at"]
    completed = traffic["completed"]
    prompt_sum = sum(p for p, _ in completed)
    output_sum = sum(c for _, c in completed)
    q = prometheus.value
    # Length histograms: one sample per completed request.
    assert q("sum(qwen_request_prompt_tokens_count)", at) == 6
    assert q("sum(qwen_request_prompt_tokens_sum)", at) == prompt_sum
    assert q("sum(qwen_request_generation_tokens_sum)", at) == output_sum
    # Prompt tokens are counted once prefilled: the 6 completed plus A and B.
    assert q("sum(qwen_prompt_tokens_total)", at) == prompt_sum + traffic["burst_prompt_tokens"]
    # Every generated token is either a first token or follows one.
    generated = q("sum(qwen_generation_tokens_total)", at)
    first = q("sum(qwen_time_to_first_token_seconds_count)", at)
    gaps = q("sum(qwen_inter_token_latency_seconds_count)", at)
    assert first == 8  # 6 completed + A + B; D was refused
    assert generated == first + gaps
    assert generated >= output_sum + 2  # A and B each delivered at least one token
    # The deadline request (phase 2) generated tokens too.
    assert q("sum(qwen_time_to_first_token_seconds_count)") == 9
    assert q("sum(qwen_generation_tokens_total)") > generated


def test_latency_histograms_are_consistent(prometheus, traffic):
    at = traffic["phase1_at"]
    q = prometheus.value
    for phase in ("queue", "prefill", "decode"):
        assert q(f"sum(qwen_request_{phase}_time_seconds_count)", at) == 6
    assert q("sum(qwen_e2e_request_latency_seconds_count)", at) == 6
    # Only C waited for a slot, and for longer than 0.5 s.
    assert (
        q('sum(qwen_request_queue_time_seconds_count) - sum(qwen_request_queue_time_seconds_bucket{le="0.3"})', at) == 1
    )
    assert q("max(qwen_request_queue_time_seconds_sum)", at) >= 0.5
    engine = sum(q(f"sum(qwen_request_{phase}_time_seconds_sum)", at) for phase in ("queue", "prefill", "decode"))
    e2e = q("sum(qwen_e2e_request_latency_seconds_sum)", at)
    assert 0 < engine <= e2e < 60  # the service's view contains the engine's phases
    ttft_p50 = q("histogram_quantile(0.5, sum by (le) (qwen_time_to_first_token_seconds_bucket))", at)
    assert 0 < ttft_p50 < 5
    itl_mean = q("sum(qwen_inter_token_latency_seconds_sum) / sum(qwen_inter_token_latency_seconds_count)", at)
    assert 0 < itl_mean < 1
    # Buckets are cumulative and end in +Inf == count.
    buckets = prometheus.values("sum by (le) (qwen_time_to_first_token_seconds_bucket)", "le", at)
    ordered = [buckets[le] for le in sorted(buckets, key=float)]
    assert ordered == sorted(ordered) and buckets["+Inf"] == 8
    assert {"0.01", "30.0"} <= set(buckets)  # resolves 10 ms .. 30 s


def test_load_gauges_saw_the_burst(prometheus, traffic):
    q = prometheus.value
    assert q("max_over_time(qwen_requests_running[10m])") == 2
    assert q("max_over_time(qwen_requests_waiting[10m])") == 1
    assert q("qwen_requests_running_limit") == 2
    assert q("qwen_requests_waiting_limit") == 1
    assert q("qwen_engine_compute_threads") == 1  # --threads 1: the governor never goes above it nor below 1
    assert 0 < q("max_over_time(qwen_kv_cache_usage_ratio[10m])") <= 1
    # Everything ended: slots and cache are free again.
    assert q("qwen_requests_running") == 0 and q("qwen_requests_waiting") == 0
    assert q("qwen_kv_cache_usage_ratio") == 0
    # Some decode steps ran A and B together.
    steps = q("sum(qwen_decode_batch_size_count)")
    assert steps - q('sum(qwen_decode_batch_size_bucket{le="1.0"})') > 0
    assert q('sum(qwen_decode_batch_size_bucket{le="2.0"})') == steps  # never above --max-batch-size


def test_engine_info_names_the_replicas_kernel_path(prometheus, traffic):
    # The server runs the default --quantization auto: resolved per node to one of these, never left "auto".
    resolved = prometheus.values('qwen_engine_info{requested_quantization="auto"}', "quantization")
    assert list(resolved.values()) == [1] and set(resolved) <= {"int5", "int8", "int8-weight-only"}, resolved


def test_grpc_server_metrics(prometheus, traffic):
    handled = prometheus.values(
        'sum by (code_method) (label_join(grpc_server_handled_total{grpc_service="qwen.QwenService"}, "code_method", "/", "grpc_method", "grpc_code"))',
        "code_method",
    )
    assert handled == {
        "Chat/OK": 3,
        "Chat/InvalidArgument": 1,
        "Chat/DeadlineExceeded": 1,
        "ChatStream/OK": 3,
        "ChatStream/Canceled": 2,
        "ChatStream/ResourceExhausted": 1,
        "CountTokens/OK": 2,
    }
    started = prometheus.values(
        'sum by (grpc_method) (grpc_server_started_total{grpc_service="qwen.QwenService"})', "grpc_method"
    )
    assert started == {"Chat": 5, "ChatStream": 6, "CountTokens": 2}
    timed = prometheus.values(
        'sum by (grpc_method) (grpc_server_handling_seconds_count{grpc_service="qwen.QwenService"})', "grpc_method"
    )
    assert timed == started
    types = prometheus.values(
        'sum by (grpc_type) (grpc_server_started_total{grpc_service="qwen.QwenService"})', "grpc_type"
    )
    assert types == {"unary": 7, "server_stream": 6}
    # The harness' health checks are counted too, by their own method.
    assert prometheus.value('sum(grpc_server_handled_total{grpc_service="grpc.health.v1.Health", grpc_code="OK"})') > 0
    sent = prometheus.value('sum(grpc_server_msg_sent_total{grpc_method="ChatStream"})')
    assert sent >= 3 * 2 + 2  # three complete streams (>= 2 messages each) and A, B's first messages


def test_process_metrics(prometheus, traffic):
    rss = prometheus.value(f'process_resident_memory_bytes{{job="{JOB}", pod="{POD}"}}')
    assert 50e6 < rss < 16e9
    assert prometheus.value(f'increase(process_cpu_seconds_total{{job="{JOB}"}}[10m])') > 0
    assert prometheus.value(f'process_open_fds{{job="{JOB}"}}') > 0


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _substitute(expr: str) -> str:
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$job", JOB)
        .replace("$namespace", NAMESPACE)
        .replace("$pod", POD)
        .replace("$model", ".*")
    )


def test_every_dashboard_query_returns_data(prometheus, traffic):
    targets = [
        (panel["title"], target["expr"]) for panel in _dashboard()["panels"] for target in panel.get("targets", [])
    ]
    assert len(targets) >= 25
    empty = [(title, expr) for title, expr in targets if not prometheus.query(_substitute(expr))]
    assert not empty, f"dashboard queries without data: {empty}"
    # Per-pod panels split by the pod label and show real values.
    panels = {panel["title"]: panel for panel in _dashboard()["panels"]}
    for title, low, high in (("Memory per pod", 50e6, 16e9), ("CPU per pod", 0, 2.5)):
        (target,) = panels[title]["targets"]
        per_pod = prometheus.values(_substitute(target["expr"]), "pod")
        assert list(per_pod) == [POD] and low < per_pod[POD] < high, (title, per_pod)


def test_dashboard_variables_find_this_replica(prometheus, traffic):
    expected = {"job": JOB, "namespace": NAMESPACE, "pod": POD}
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"])
        assert match, variable["query"]
        selector, label = _substitute(match.group(1)), match.group(2)
        found = set(prometheus.values(f"count by ({label}) ({selector})", label))
        assert found and "" not in found, (variable["name"], found)
        if label in expected:
            assert found == {expected[label]}


def test_alert_rules_evaluate_on_live_data(prometheus, traffic):
    rules = {rule["name"]: rule for rule in prometheus.rules()}
    assert set(rules) == {
        "QwenHighTimeToFirstToken",
        "QwenQueueSaturated",
        "QwenHighErrorRatio",
        "QwenReplicaDown",
        "QwenNoReplicasUp",
    }
    for name, rule in rules.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
    # 1 overloaded + 1 deadline out of 11 requests: the error ratio alert
    # becomes pending (it needs 5 minutes to fire); nothing else is active.
    prometheus.wait_for('ALERTS{alertname="QwenHighErrorRatio", alertstate="pending"}')
    active = {alert["labels"]["alertname"]: alert for alert in prometheus.alerts()}
    assert set(active) == {"QwenHighErrorRatio"}
    ratio = float(active["QwenHighErrorRatio"]["value"])
    assert 0.05 < ratio <= 1
    assert active["QwenHighErrorRatio"]["labels"]["namespace"] == NAMESPACE


def test_replica_down_alert_when_the_server_stops(server, prometheus, traffic):
    """Last in this module: stops the server."""
    assert server.terminate() == 0
    prometheus.wait_for(f'up{{job="{JOB}"}} == 0')
    prometheus.wait_for('ALERTS{alertname="QwenReplicaDown", alertstate="pending"}')
    down = [a for a in prometheus.alerts() if a["labels"]["alertname"] == "QwenReplicaDown"]
    assert [a["labels"]["pod"] for a in down] == [POD]
