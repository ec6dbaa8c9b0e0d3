"""Builds deploy/grafana/qwen-grpc-dashboard.json with Grafana's own typed
builders (grafana-foundation-sdk, Grafana 11.6 schema), so the JSON follows
the schema by construction. Edit this file, not the JSON, then run

    python deploy/grafana/build_dashboard.py

tests/test_grafana_dashboard.py fails if the two disagree, and
tests/test_prometheus.py runs every query below against a real Prometheus.
"""

from __future__ import annotations

import json
import pathlib
import sys

from grafana_foundation_sdk.builders import common as options
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.builders import stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

OUTPUT = pathlib.Path(__file__).with_name("qwen-grpc-dashboard.json")
UID = "qwen-grpc-overview"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")

# Every query filters on these variables. `pod` is the label the Prometheus
# Operator's ServiceMonitor adds; outside Kubernetes the "All" value (.*)
# also matches series without it.
SCOPE = 'job=~"$job", namespace=~"$namespace", pod=~"$pod"'
QWEN = SCOPE + ', model=~"$model"'  # qwen_* series also carry the model label
RATE = "$__rate_interval"


def query(expr: str, legend: str, ref: str = "A") -> prom.Dataquery:
    return prom.Dataquery().expr(expr).legend_format(legend).ref_id(ref).range().datasource(DATASOURCE)


def quantiles(metric: str, by: str = "") -> list[prom.Dataquery]:
    group = f"{by}, le" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return [
        query(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{QWEN}}}[{RATE}])))",
            f"{prefix}p{int(q * 100)}",
            ref,
        )
        for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))
    ]


def series(
    title: str, description: str, unit: str, targets: list[prom.Dataquery], *, width: int = 12
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(width)
        .line_width(1)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
        .legend(
            options.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["mean", "max", "lastNotNull"])
        )
        .tooltip(options.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING))
    )
    for target in targets:
        panel = panel.with_target(target)
    return panel


def single(title: str, description: str, unit: str, expr: str) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(4)
        .span(6)
        .graph_mode(common.BigValueGraphMode.AREA)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(options.ReduceDataOptions().calcs(["lastNotNull"]))
        .with_target(query(expr, title))
    )


def variable(name: str, label: str, expr: str) -> dash.QueryVariable:
    return (
        dash.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(expr)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(VariableOption(selected=True, text="All", value="$__all"))
    )


def build() -> dict:
    # A server-side failure: what QwenHighErrorRatio alerts on.
    failed_server = (
        f'rate(qwen_requests_failed_total{{{QWEN}, reason=~"internal|overloaded|unavailable|deadline"}}[{RATE}])'
    )
    all_requests = f"(sum(rate(qwen_requests_finished_total{{{QWEN}}}[{RATE}])) + sum(rate(qwen_requests_failed_total{{{QWEN}}}[{RATE}])))"
    board = (
        dash.Dashboard("qwen-grpc")
        .uid(UID)
        .description("Qwen chat serving over gRPC: latency, throughput, load, errors and resources per replica.")
        .tags(["qwen-grpc", "llm", "grpc"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .with_variable(dash.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(variable("job", "Job", "label_values(qwen_requests_running, job)"))
        .with_variable(
            variable("namespace", "Namespace", 'label_values(qwen_requests_running{job=~"$job"}, namespace)')
        )
        .with_variable(
            variable(
                "model", "Model", 'label_values(qwen_requests_running{job=~"$job", namespace=~"$namespace"}, model)'
            )
        )
        .with_variable(
            variable(
                "pod",
                "Pod",
                'label_values(qwen_requests_running{job=~"$job", namespace=~"$namespace", model=~"$model"}, pod)',
            )
        )
        # --- overview ---------------------------------------------------------
        .with_row(dash.Row("Overview"))
        .with_panel(
            single(
                "Replicas up",
                "Scrape targets of the selected job and namespace that answered the last scrape.",
                "none",
                'sum(up{job=~"$job", namespace=~"$namespace", pod=~"$pod"})',
            )
        )
        .with_panel(
            single(
                "Generated tokens/s",
                "Output tokens per second over all selected replicas.",
                "short",
                f"sum(rate(qwen_generation_tokens_total{{{QWEN}}}[{RATE}]))",
            )
        )
        .with_panel(
            single(
                "Time to first token p95",
                "95th percentile over all selected replicas.",
                "s",
                f"histogram_quantile(0.95, sum by (le) (rate(qwen_time_to_first_token_seconds_bucket{{{QWEN}}}[{RATE}])))",
            )
        )
        .with_panel(
            single(
                "Requests waiting",
                "Requests queued for a KV-cache slot, all selected replicas (the HPA metric).",
                "none",
                f"sum(qwen_requests_waiting{{{QWEN}}})",
            )
        )
        # --- latency ----------------------------------------------------------
        .with_row(dash.Row("Latency"))
        .with_panel(
            series(
                "Time to first token",
                "From the request's arrival at the service (before tokenization) to its first token.",
                "s",
                quantiles("qwen_time_to_first_token_seconds"),
            )
        )
        .with_panel(
            series(
                "Inter-token latency",
                "Gap between consecutive tokens of one stream: how smooth streaming is.",
                "s",
                quantiles("qwen_inter_token_latency_seconds"),
            )
        )
        .with_panel(
            series(
                "Time to first token p95 by pod",
                "A single slow replica shows here before it moves the fleet percentile.",
                "s",
                [
                    query(
                        f"histogram_quantile(0.95, sum by (pod, le) (rate(qwen_time_to_first_token_seconds_bucket{{{QWEN}}}[{RATE}])))",
                        "{{pod}}",
                    )
                ],
            )
        )
        .with_panel(
            series(
                "Request phases p95",
                "Queue (waiting for a slot), prefill (slot to first token), decode (first to last token), end to end.",
                "s",
                [
                    query(
                        f"histogram_quantile(0.95, sum by (le) (rate(qwen_request_{phase}_time_seconds_bucket{{{QWEN}}}[{RATE}])))",
                        phase,
                        ref,
                    )
                    for phase, ref in (("queue", "A"), ("prefill", "B"), ("decode", "C"))
                ]
                + [
                    query(
                        f"histogram_quantile(0.95, sum by (le) (rate(qwen_e2e_request_latency_seconds_bucket{{{QWEN}}}[{RATE}])))",
                        "end to end",
                        "D",
                    )
                ],
            )
        )
        # --- throughput and load ----------------------------------------------
        .with_row(dash.Row("Throughput and load"))
        .with_panel(
            series(
                "Tokens per second",
                "Generated tokens per replica, and prompt tokens prefilled over all selected replicas.",
                "short",
                [
                    query(f"sum by (pod) (rate(qwen_generation_tokens_total{{{QWEN}}}[{RATE}]))", "{{pod}} generated"),
                    query(f"sum(rate(qwen_prompt_tokens_total{{{QWEN}}}[{RATE}]))", "prompt (all)", "B"),
                ],
            )
        )
        .with_panel(
            series(
                "Requests per second by outcome",
                "Completed requests by finish reason and failed ones by reason.",
                "reqps",
                [
                    query(
                        f"sum by (finish_reason) (rate(qwen_requests_finished_total{{{QWEN}}}[{RATE}]))",
                        "{{finish_reason}}",
                    ),
                    query(
                        f"sum by (reason) (rate(qwen_requests_failed_total{{{QWEN}}}[{RATE}]))",
                        "failed: {{reason}}",
                        "B",
                    ),
                ],
            )
        )
        .with_panel(
            series(
                "Queue depth and running requests",
                "Per replica: requests waiting for a slot and requests holding one.",
                "none",
                [
                    query(f"sum by (pod) (qwen_requests_waiting{{{QWEN}}})", "{{pod}} waiting"),
                    query(f"sum by (pod) (qwen_requests_running{{{QWEN}}})", "{{pod}} running", "B"),
                ],
            )
        )
        .with_panel(
            series(
                "Decode batch size",
                "Requests decoded together per engine step: mean and p95 per replica.",
                "none",
                [
                    query(
                        f"sum by (pod) (rate(qwen_decode_batch_size_sum{{{QWEN}}}[{RATE}]))"
                        f" / sum by (pod) (rate(qwen_decode_batch_size_count{{{QWEN}}}[{RATE}]))",
                        "{{pod}} mean",
                    ),
                    query(
                        f"histogram_quantile(0.95, sum by (pod, le) (rate(qwen_decode_batch_size_bucket{{{QWEN}}}[{RATE}])))",
                        "{{pod}} p95",
                        "B",
                    ),
                ],
            )
        )
        .with_panel(
            series(
                "KV-cache usage",
                "Fraction of KV-cache positions holding tokens, per replica.",
                "percentunit",
                [query(f"max by (pod) (qwen_kv_cache_usage_ratio{{{QWEN}}})", "{{pod}}")],
            )
        )
        .with_panel(
            series(
                "Prefix cache: hit ratio and fill",
                "Share of prompt tokens whose KV was reused from the prefix cache instead of computed, and the "
                "share of the cache's blocks in use (--prefix-cache-mb), per replica.",
                "percentunit",
                [
                    query(
                        f"sum by (pod) (rate(qwen_prefix_cache_hit_tokens_total{{{QWEN}}}[{RATE}]))"
                        f" / sum by (pod) (rate(qwen_prompt_tokens_total{{{QWEN}}}[{RATE}]))",
                        "{{pod}} hit ratio",
                    ),
                    query(
                        f"max by (pod) (qwen_prefix_cache_blocks_used{{{QWEN}}})"
                        f" / max by (pod) (qwen_prefix_cache_blocks_limit{{{QWEN}}} > 0)",
                        "{{pod}} fill",
                        "B",
                    ),
                ],
            )
        )
        .with_panel(
            series(
                "Prefix cache evictions",
                "Blocks (16 tokens of KV) evicted per second to make room; a steady rate with a low hit ratio "
                "means --prefix-cache-mb is too small for the traffic's working set.",
                "short",
                [query(f"sum by (pod) (rate(qwen_prefix_cache_evictions_total{{{QWEN}}}[{RATE}]))", "{{pod}}")],
            )
        )
        .with_panel(
            series(
                "Speculative decoding",
                "Share of prompt-lookup draft tokens accepted, and share of generated tokens that came from "
                "accepted drafts (tokens without a forward pass of their own), per replica.",
                "percentunit",
                [
                    query(
                        f"sum by (pod) (rate(qwen_speculative_accepted_tokens_total{{{QWEN}}}[{RATE}]))"
                        f" / sum by (pod) (rate(qwen_speculative_draft_tokens_total{{{QWEN}}}[{RATE}]))",
                        "{{pod}} acceptance",
                    ),
                    query(
                        f"sum by (pod) (rate(qwen_speculative_accepted_tokens_total{{{QWEN}}}[{RATE}]))"
                        f" / sum by (pod) (rate(qwen_generation_tokens_total{{{QWEN}}}[{RATE}]))",
                        "{{pod}} of generated",
                        "B",
                    ),
                ],
            )
        )
        .with_panel(
            series(
                "Prompt and output length p95",
                "Tokens per request.",
                "short",
                [
                    query(
                        f"histogram_quantile(0.95, sum by (le) (rate(qwen_request_prompt_tokens_bucket{{{QWEN}}}[{RATE}])))",
                        "prompt",
                    ),
                    query(
                        f"histogram_quantile(0.95, sum by (le) (rate(qwen_request_generation_tokens_bucket{{{QWEN}}}[{RATE}])))",
                        "output",
                        "B",
                    ),
                ],
            )
        )
        # --- errors -------------------------------------------------------------
        .with_row(dash.Row("Errors"))
        .with_panel(
            series(
                "gRPC errors by code",
                "Calls that ended with a status other than OK, per second, by gRPC status code and method.",
                "reqps",
                [
                    query(
                        f'sum by (grpc_code, grpc_method) (rate(grpc_server_handled_total{{{SCOPE}, grpc_code!="OK"}}[{RATE}]))',
                        "{{grpc_method}} {{grpc_code}}",
                    )
                ],
            )
        )
        .with_panel(
            series(
                "Server-side error ratio",
                "Share of chat requests failing with internal, overloaded, unavailable or deadline errors (the alert's ratio).",
                "percentunit",
                [query(f"sum({failed_server}) / {all_requests}", "error ratio")],
            )
        )
        .with_panel(
            series(
                "gRPC calls by method",
                "Completed calls per second by method and status code.",
                "reqps",
                [
                    query(
                        f'sum by (grpc_method, grpc_code) (rate(grpc_server_handled_total{{{SCOPE}, grpc_service="qwen.QwenService"}}[{RATE}]))',
                        "{{grpc_method}} {{grpc_code}}",
                    )
                ],
            )
        )
        .with_panel(
            series(
                "gRPC handling time p95",
                "Handler time per method (a whole stream for ChatStream).",
                "s",
                [
                    query(
                        f'histogram_quantile(0.95, sum by (grpc_method, le) (rate(grpc_server_handling_seconds_bucket{{{SCOPE}, grpc_service="qwen.QwenService"}}[{RATE}])))',
                        "{{grpc_method}}",
                    )
                ],
            )
        )
        # --- resources ------------------------------------------------------------
        .with_row(dash.Row("Resources"))
        .with_panel(
            series(
                "CPU per pod",
                "CPU cores used by the server process (all threads, including the engine's).",
                "short",
                [query(f"sum by (pod) (rate(process_cpu_seconds_total{{{SCOPE}}}[{RATE}]))", "{{pod}}")],
            )
        )
        .with_panel(
            series(
                "Memory per pod",
                "Resident memory of the server process (weights, KV cache, runtime).",
                "bytes",
                [query(f"sum by (pod) (process_resident_memory_bytes{{{SCOPE}}})", "{{pod}}")],
            )
        )
        .with_panel(
            series(
                "Compute threads per pod",
                "Threads the engine's forward passes run on (qwen_engine_compute_threads): --threads, or fewer while "
                "the node keeps them off their cores. Below --threads, the replica is slowed by its neighbours.",
                "short",
                [query(f"min by (pod) (qwen_engine_compute_threads{{{QWEN}}})", "{{pod}}")],
            )
        )
        .with_panel(
            series(
                "Replicas by kernel path",
                "Replicas per quantization, decoder-layer path and kernels, as each settled at start-up "
                "(qwen_engine_info). --quantization auto is decided per node, so one deployment may mix them; native "
                "layers false is the torch path, several times slower on x86-64 (the image's native build did not "
                "load) and the only path on ARM64; kernels avx512-vnni run prompts and batches about 1.5x faster "
                "than avx2, avx512-amx prompts ~1.1x faster again (nodes of mixed CPU generations serve at "
                "different speeds).",
                "short",
                [
                    query(
                        f"count by (quantization, native_layers, kernels) (qwen_engine_info{{{QWEN}}})",
                        "{{quantization}}, native layers {{native_layers}}, {{kernels}}",
                    )
                ],
            )
        )
    )
    model = board.build()
    for number, panel in enumerate(model.panels or (), start=1):
        panel.id_val = number  # stable, unique ids (links and "view panel" use them)
    return json.loads(json.dumps(model, cls=JSONEncoder))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run python {__file__}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
