"""The chart lints, renders and validates against Kubernetes' own schemas for
the defaults and every ci/*-values.yaml, and its values schema refuses bad
values."""

from __future__ import annotations

import pathlib

import kubernetes_validate
import pytest
import yaml
from chart_render import CHART, CI_VALUES, IMAGE_VALUES, KUBE_VERSIONS, helm, render, template_text

VALUES_CASES = [None, *CI_VALUES]
CASE_IDS = ["defaults", *[p.name.removesuffix("-values.yaml") for p in CI_VALUES]]
# Custom resources have no schema in kubernetes-validate; test_chart_policy
# checks their structure instead.
CUSTOM_RESOURCE_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "GRPCRoute"}


def _rendered_templates(text: str) -> set[str]:
    return {line.removeprefix("# Source: qwen-grpc/") for line in text.splitlines() if line.startswith("# Source: ")}


def test_every_template_is_rendered_by_some_ci_values_file():
    """An optional object no ci file turns on is never linted or validated
    (the PrometheusRule shipped without rules that way)."""
    templates = {str(p.relative_to(CHART)) for p in (CHART / "templates").rglob("*.yaml")}
    rendered = set()
    for values in CI_VALUES:
        rendered |= _rendered_templates(template_text(values).stdout)
    assert templates - rendered == set(), "add a ci/*-values.yaml that renders them"


def test_ci_files_install_standalone():
    """chart-testing installs each ci file alone: each names an image."""
    for values in CI_VALUES:
        assert yaml.safe_load(values.read_text())["image"]["repository"], values.name


@pytest.mark.parametrize("values", VALUES_CASES, ids=CASE_IDS)
def test_helm_lint_strict(values: pathlib.Path | None):
    args = ["lint", "--strict", str(CHART), "--values", str(values or IMAGE_VALUES)]
    result = helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", VALUES_CASES, ids=CASE_IDS)
def test_rendered_objects_validate_strictly(values: pathlib.Path | None):
    for version in KUBE_VERSIONS:
        text = template_text(*([values] if values else []), kube_version=version).stdout
        docs = [doc for doc in yaml.safe_load_all(text) if doc]
        assert docs
        for doc in docs:
            if doc["kind"] in CUSTOM_RESOURCE_KINDS:
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(
                    f"{doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {error.message}"
                )


def test_validation_catches_a_broken_object():
    """The validator is not a no-op: an unknown field fails strict validation."""
    deployment = next(d for d in render() if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["portName"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"settings.model": "/elsewhere"}, "Additional property model is not allowed"),
        ({"settings.grpc_port": "1234"}, "Additional property grpc_port is not allowed"),
        ({"settings.replica_name": "x"}, "Additional property replica_name is not allowed"),
        ({"settings.keepalive_time": "0"}, "settings.keepalive_time"),
        ({"settings.max_batch_size": "0"}, "settings.max_batch_size"),
        ({"settings.dtype": "float16"}, "settings.dtype"),
        ({"settings.no_such_setting": "1"}, "Additional property no_such_setting is not allowed"),
        ({"model.source": "s3"}, "model.source"),
        ({"image.pullPolicy": "Sometimes"}, "image.pullPolicy"),
        ({"image.digest": "latest"}, "image.digest"),
        ({"server.grpcPort": "70000"}, "server.grpcPort"),
        ({"drain.shutdownMarginSeconds": "1"}, "drain.shutdownMarginSeconds"),
        ({"probes.readiness.periodSeconds": "0"}, "probes.readiness.periodSeconds"),
        ({"resources.limits.cpu": "two"}, "resources.limits.cpu"),
        ({"autoscaling.targetCPUUtilizationPercentage": "150"}, "targetCPUUtilizationPercentage"),
        ({"apiKeys.keys[0]": "short"}, "apiKeys.keys.0"),
        ({"otel.env.NOT_OTEL": "x"}, "otel.env"),
        ({"unknownTopLevel": "x"}, "Additional property unknownTopLevel is not allowed"),
        ({"topologySpread.whenUnsatisfiable": "Maybe"}, "topologySpread.whenUnsatisfiable"),
        ({"settings.rate_limit_per_second": "-1"}, "settings.rate_limit_per_second"),
        ({"settings.max_request_bytes": "10"}, "settings.max_request_bytes"),
        ({"settings.auth_public_reflection": "maybe"}, "settings.auth_public_reflection"),
        ({"podDisruptionBudget.unhealthyPodEvictionPolicy": "Never"}, "unhealthyPodEvictionPolicy"),
        ({"metrics.serviceMonitor.scheme": "ftp"}, "metrics.serviceMonitor.scheme"),
        ({"keda.serverAddress": "prometheus:9090"}, "keda.serverAddress"),
        ({"http.port": "0"}, "http.port"),
    ],
)
def test_schema_rejects_bad_values(sets: dict[str, str], message: str):
    result = template_text(sets=sets, check=False)
    assert result.returncode != 0, f"accepted {sets}"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"model.source": "pvc"}, "model.source=pvc needs model.pvc.claimName"),
        ({"metrics.serviceMonitor.enabled": "true"}, "metrics.serviceMonitor.enabled needs metrics.enabled"),
        ({"autoscaling.enabled": "true", "autoscaling.waitingRequests.enabled": "true"}, "needs metrics.enabled"),
        ({"autoscaling.enabled": "true", "autoscaling.waitingRequests.enabled": "false"}, "needs a metric"),
        ({"apiKeys.enabled": "true"}, "apiKeys.enabled needs apiKeys.existingSecret or apiKeys.keys"),
        ({"drain.timeoutSeconds": "30"}, "is shorter than settings.max_connection_age_grace"),
        ({"image.repository": ""}, "image.repository is required"),
        ({"autoscaling.enabled": "true", "keda.enabled": "true", "metrics.enabled": "true"}, "enable one of them"),
        ({"keda.enabled": "true"}, "keda.enabled needs metrics.enabled"),
        (
            {"apiKeys.enabled": "true", "apiKeys.keys[0]": "k" * 20, "settings.auth_public_health": "false"},
            "probes send no key",
        ),
        ({"grpcRoute.enabled": "true"}, "grpcRoute.enabled needs grpcRoute.parentRefs"),
        ({"ingress.enabled": "true"}, "ingress.enabled needs ingress.hosts"),
    ],
)
def test_inconsistent_values_fail_with_a_message(sets: dict[str, str], message: str):
    result = template_text(sets=sets, check=False)
    assert result.returncode != 0, f"accepted {sets}"
    assert message in result.stderr, result.stderr


def _undocumented(
    node: yaml.MappingNode, schema: dict, lines: list[str], path: str, parent_commented: bool
) -> list[str]:
    """Walk values.yaml beside its schema. A setting (a key whose schema has no
    `properties`: scalars, lists, free-form objects such as resources) needs a
    comment on the line above it, or on its parent section's line."""
    missing = []
    for key_node, value_node in node.value:
        key = key_node.value
        line = key_node.start_mark.line
        commented = line > 0 and lines[line - 1].strip().startswith("#")
        sub_schema = schema.get("properties", {}).get(key)
        if sub_schema is None:
            missing.append(f"{path}{key} (not in values.schema.json)")
        elif "properties" in sub_schema and isinstance(value_node, yaml.MappingNode):
            missing += _undocumented(value_node, sub_schema, lines, f"{path}{key}.", commented)
        elif not (commented or parent_commented):
            missing.append(f"{path}{key}")
    return missing


def test_every_value_is_documented_and_typed():
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    text = (CHART / "values.yaml").read_text()
    missing = _undocumented(yaml.compose(text), schema, text.splitlines(), "", False)
    assert not missing, f"values without a comment or schema: {missing}"


def test_chart_packages(tmp_path):
    import tarfile

    result = helm("package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("qwen-grpc-*.tgz")
    names = tarfile.open(archive).getnames()
    for needed in (
        "Chart.yaml",
        "values.yaml",
        "values.schema.json",
        "templates/deployment.yaml",
        "templates/tests/test-grpc.yaml",
        "templates/NOTES.txt",
        "README.md",
        "files/helm-test.py",
        "files/prometheus/qwen-grpc-alerts.yaml",
        "files/grafana/qwen-grpc-dashboard.json",
    ):
        assert f"qwen-grpc/{needed}" in names, (needed, result.stdout)
