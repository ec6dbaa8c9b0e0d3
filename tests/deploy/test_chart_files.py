"""The chart ships the Grafana dashboards and Prometheus rules from
deploy/grafana and deploy/prometheus (single source) as copies under its
files/; the copies must match, and the templates must package them."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import yaml

from chart_render import CHART, REPO_ROOT, RELEASE, helm
from harness import load_script


@pytest.fixture(scope="module")
def syncer():
    return load_script(REPO_ROOT / "deploy/helm/sync_chart_files.py")


def test_chart_copies_match_their_sources(syncer):
    problems = syncer.differences()
    assert not problems, "run `make chart-sync`:\n" + "\n".join(problems)


def test_a_stale_copy_is_detected(syncer, tmp_path, monkeypatch):
    source, copies = tmp_path / "grafana", tmp_path / "chart-grafana"
    source.mkdir()
    copies.mkdir()
    (source / "a.json").write_text('{"title": "new"}')
    (copies / "a.json").write_text('{"title": "old"}')
    (copies / "gone.json").write_text("{}")
    monkeypatch.setattr(syncer, "SOURCES", {source: ("*.json", copies)})
    problems = syncer.differences()
    assert any("differs" in p for p in problems) and any("no source" in p for p in problems)
    syncer.sync()
    assert syncer.differences() == []


@pytest.fixture()
def chart_with_monitoring_files(tmp_path) -> pathlib.Path:
    """A chart copy holding one dashboard and one rules file, as the synced
    chart will once deploy/grafana and deploy/prometheus have them."""
    chart = tmp_path / "qwen-grpc"
    shutil.copytree(CHART, chart)
    dashboards, rules = chart / "files" / "grafana", chart / "files" / "prometheus"
    dashboards.mkdir(parents=True, exist_ok=True)
    rules.mkdir(parents=True, exist_ok=True)
    (dashboards / "qwen-grpc.json").write_text(json.dumps({"title": "qwen-grpc", "panels": [{"id": 1}]}, indent=2))
    (rules / "qwen-grpc.rules.yaml").write_text(yaml.safe_dump({"groups": [{
        "name": "qwen-grpc", "rules": [{"alert": "QwenQueueSaturated", "expr": "max(qwen_requests_waiting) > 32",
                                        "for": "5m", "labels": {"severity": "warning"}}]}]}))  # fmt: skip
    return chart


def test_dashboard_configmap_carries_the_dashboard_files(chart_with_monitoring_files):
    chart = chart_with_monitoring_files
    text = helm("template", RELEASE, str(chart), "--set", "grafanaDashboard.enabled=true",
                "--show-only", "templates/grafana-dashboard.yaml").stdout  # fmt: skip
    configmap = yaml.safe_load(text)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"]["qwen-grpc.json"] == (chart / "files/grafana/qwen-grpc.json").read_text()
    assert json.loads(configmap["data"]["qwen-grpc.json"])["title"] == "qwen-grpc"


def test_prometheus_rule_carries_the_rules_files_and_extra_groups(chart_with_monitoring_files):
    text = helm("template", RELEASE, str(chart_with_monitoring_files),
                "--set", "metrics.enabled=true", "--set", "metrics.prometheusRule.enabled=true",
                "--set", "metrics.prometheusRule.extraGroups[0].name=extra",
                "--set", "metrics.prometheusRule.extraGroups[0].rules[0].record=qwen:x",
                "--set", "metrics.prometheusRule.extraGroups[0].rules[0].expr=1",
                "--show-only", "templates/prometheusrule.yaml").stdout  # fmt: skip
    groups = yaml.safe_load(text)["spec"]["groups"]
    assert [g["name"] for g in groups] == ["qwen-grpc", "extra"]
    assert groups[0]["rules"][0]["alert"] == "QwenQueueSaturated"
