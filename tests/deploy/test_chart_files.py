"""The chart ships the Grafana dashboards and Prometheus rules from
deploy/grafana and deploy/prometheus (single source) as copies under its
files/; the copies must match, and the templates must package them."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import yaml
from chart_render import CHART, IMAGE_VALUES, RELEASE, REPO_ROOT, helm
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


def test_the_sync_copies_rules_but_not_their_promtool_tests(syncer, tmp_path, monkeypatch):
    source, copies = tmp_path / "prometheus", tmp_path / "chart-prometheus"
    source.mkdir()
    (source / "alerts.yaml").write_text("groups: []\n")
    (source / "alerts.test.yaml").write_text("rule_files: [alerts.yaml]\n")
    monkeypatch.setattr(syncer, "SOURCES", {source: ("*.yaml", copies)})
    syncer.sync()
    assert sorted(p.name for p in copies.iterdir()) == ["alerts.yaml"]


def _template(chart: pathlib.Path, *args: str, check: bool = True):
    return helm("template", RELEASE, str(chart), "--values", str(IMAGE_VALUES), *args, check=check)


def test_dashboard_configmap_carries_the_dashboard_files():
    text = _template(
        CHART, "--set", "grafanaDashboard.enabled=true", "--show-only", "templates/grafana-dashboard.yaml"
    ).stdout
    configmap = yaml.safe_load(text)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    sources = sorted((REPO_ROOT / "deploy" / "grafana").glob("*.json"))
    assert sources and sorted(configmap["data"]) == [p.name for p in sources]
    for path in sources:
        assert json.loads(configmap["data"][path.name]) == json.loads(path.read_text())


def _alerts(groups: list[dict]) -> dict[str, str]:
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"] if "alert" in rule}


def test_prometheus_rule_carries_the_shipped_alerts_and_extra_groups():
    """The defect this catches: the chart globbed *.rules.yaml while the rules
    file is qwen-grpc-alerts.yaml, so enabling the rule failed to render."""
    text = _template(
        CHART,
        "--set",
        "metrics.enabled=true",
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "metrics.prometheusRule.extraGroups[0].name=extra",
        "--set",
        "metrics.prometheusRule.extraGroups[0].rules[0].record=qwen:x",
        "--set",
        "metrics.prometheusRule.extraGroups[0].rules[0].expr=1",
        "--show-only",
        "templates/prometheusrule.yaml",
    ).stdout
    groups = yaml.safe_load(text)["spec"]["groups"]
    shipped = yaml.safe_load((REPO_ROOT / "deploy/prometheus/qwen-grpc-alerts.yaml").read_text())["groups"]
    assert [g["name"] for g in groups] == [g["name"] for g in shipped] + ["extra"]
    assert _alerts(groups).keys() == _alerts(shipped).keys() and len(_alerts(shipped)) >= 5


def test_replica_alerts_select_this_release_whatever_its_name():
    """The shipped rules find replicas by a job=~".*qwen.*" regex; the chart
    pins them to its own job (the Service name) and namespace, so a
    fullnameOverride without "qwen" in it still alerts."""
    text = _template(
        CHART,
        "--namespace",
        "llm",
        "--set",
        "fullnameOverride=coder",
        "--set",
        "metrics.enabled=true",
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--show-only",
        "templates/prometheusrule.yaml",
    ).stdout
    alerts = _alerts(yaml.safe_load(text)["spec"]["groups"])
    assert alerts["QwenReplicaDown"].strip() == 'up{job="coder",namespace="llm"} == 0'
    assert alerts["QwenNoReplicasUp"].strip() == 'absent(up{job="coder",namespace="llm"} == 1)'
    assert not [name for name, expr in alerts.items() if "qwen.*" in expr]


def test_a_chart_without_rules_refuses_an_empty_prometheus_rule(tmp_path):
    chart = tmp_path / "qwen-grpc"
    shutil.copytree(CHART, chart)
    shutil.rmtree(chart / "files" / "prometheus")
    result = _template(
        chart, "--set", "metrics.enabled=true", "--set", "metrics.prometheusRule.enabled=true", check=False
    )
    assert result.returncode != 0 and "no rules" in result.stderr, result.stderr
