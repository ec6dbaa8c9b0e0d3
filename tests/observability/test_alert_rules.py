"""The alert rules pass `promtool check rules`, and `promtool test rules`
runs the unit tests beside them: every alert has a case where it fires and
one where it stays quiet. (tests/observability/test_prometheus.py also loads
the rules into a live Prometheus.)"""

from __future__ import annotations

import subprocess

import yaml
from harness import REPO_ROOT
from prometheus_server import require_binary

RULES = REPO_ROOT / "deploy" / "prometheus" / "qwen-grpc-alerts.yaml"
RULE_TESTS = REPO_ROOT / "deploy" / "prometheus" / "qwen-grpc-alerts.test.yaml"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_binary("promtool"), *args], capture_output=True, text=True, cwd=RULES.parent)


def test_rules_are_valid():
    result = _promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_promtool_unit_tests_pass():
    result = _promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_both_ways():
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    fires = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert alerts == fires == quiet


def test_every_alert_has_severity_and_text():
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
            assert rule.get("for"), rule["alert"]  # no alert fires on a single bad evaluation


def test_a_broken_threshold_fails_the_unit_tests(tmp_path):
    """The unit tests pin the thresholds: a changed one is caught."""
    (tmp_path / RULES.name).write_text(RULES.read_text().replace(") > 2\n", ") > 5\n"))
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    result = subprocess.run(
        [require_binary("promtool"), "test", "rules", RULE_TESTS.name], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode != 0
    assert "QwenHighTimeToFirstToken" in result.stdout + result.stderr
