"""What the kind end-to-end test relies on, checked where kind is absent: its
chart values render and validate, its client Job is a valid hardened Job,
its in-cluster client runs against a real server, and the shared
load-balancing assertions accept and reject what they should."""

from __future__ import annotations

import json
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml
from chart_render import CHART, KUBE_VERSIONS, REPO_ROOT, helm, template_text
from harness import running_server
from lb_assertions import assert_no_failures, assert_spread

KIND_DIR = REPO_ROOT / "tests" / "kind"
sys.path.insert(0, str(KIND_DIR))
from kind_manifests import client_job  # noqa: E402


def test_kind_values_lint_and_validate():
    values = KIND_DIR / "values-kind.yaml"
    lint = helm("lint", "--strict", str(CHART), "--values", str(values), check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = [d for d in yaml.safe_load_all(template_text(values).stdout) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSIONS[0], strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["imagePullPolicy"] == "Never"  # `kind load`ed, never pulled
    # Streams of 200 tokens must be able to finish inside the drain the test triggers.
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert float(config["QWEN_DRAIN_TIMEOUT"]) >= 60
    # Three replicas (the spread test scales to 3) must fit a laptop's kind
    # node: 4 CPUs / 8 GiB, minus ~1 CPU / 1.5 GiB for kind's own pods.
    requests = pod["containers"][0]["resources"]["requests"]
    assert 3 * _cpu(requests["cpu"]) <= 3.0 and 3 * _gib(requests["memory"]) <= 6.5, requests
    assert config["QWEN_THREADS"] == "1"


def _cpu(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _gib(quantity: str) -> float:
    return float(quantity[:-2]) / (1024 if quantity.endswith("Mi") else 1)


def test_kind_flow_checks_the_cluster_version_against_the_chart():
    """The e2e test refuses a kind node older than the chart's kubeVersion."""
    sys.path.insert(0, str(KIND_DIR))
    import test_kind_e2e

    assert test_kind_e2e.chart_minimum_kubernetes() == (1, 29)
    assert test_kind_e2e._version("v1.33.1") >= (1, 29) > test_kind_e2e._version("v1.28.15")


def test_client_jobs_carry_the_cleanup_label():
    import test_kind_e2e

    job = client_job("qwen-spread", "img", ["spread", "x", "1"])
    key, value = test_kind_e2e.CLIENT_LABEL.split("=")
    assert job["metadata"]["labels"] == {key: value}


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_client_job_is_valid(version):
    job = client_job("qwen-spread", "qwen-grpc:kind-e2e", ["spread", "dns:///x:50051", "60"])
    kubernetes_validate.validate(job, version, strict=True)


def test_in_cluster_client_streams_mode_against_a_real_server(tiny_model_dir):
    with running_server(tiny_model_dir, "--threads", "1") as server:
        result = subprocess.run(
            [sys.executable, str(KIND_DIR / "in_cluster_client.py"), "streams", server.target, "2", "2"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
        )
    assert result.returncode == 0, result.stderr
    assert "STARTED" in result.stdout
    (line,) = [out for out in result.stdout.splitlines() if out.startswith("RESULT ")]
    outcomes = [tuple(o) for o in json.loads(line.removeprefix("RESULT "))["outcomes"]]
    assert sum(1 for what, _ in outcomes if what.startswith("stream-")) == 2
    assert any(what.startswith("unary-") for what, _ in outcomes)
    assert_no_failures(outcomes)


def test_in_cluster_client_spread_mode_names_the_replica(tiny_model_dir):
    with running_server(tiny_model_dir, "--threads", "1", "--replica-name", "pod-a") as server:
        result = subprocess.run(
            [sys.executable, str(KIND_DIR / "in_cluster_client.py"), "spread", server.target, "5"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
        )
    assert result.returncode == 0, result.stderr
    (line,) = [out for out in result.stdout.splitlines() if out.startswith("RESULT ")]
    replicas = json.loads(line.removeprefix("RESULT "))["replicas"]
    assert replicas == ["pod-a"] * 5
    assert_spread(replicas, {"pod-a"})


def test_spread_assertion():
    assert_spread(["a", "b", "c"] * 20, {"a", "b", "c"})
    with pytest.raises(AssertionError, match="below 20%"):
        assert_spread(["a"] * 50 + ["b"] * 9 + ["c"], {"a", "b", "c"})
    with pytest.raises(AssertionError, match="unexpected"):
        assert_spread(["a", "b", "z"] * 20, {"a", "b"})
    with pytest.raises(AssertionError, match="below"):
        assert_spread(["a", "b"] * 30, {"a", "b", "c"})  # a replica that got nothing


def test_no_failures_assertion():
    assert_no_failures([("s1", "OK"), ("u1", "OK")])
    with pytest.raises(AssertionError, match="1 failed"):
        assert_no_failures([("s1", "OK"), ("u1", "UNAVAILABLE")])
