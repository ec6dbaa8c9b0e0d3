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
PENDING_SETTINGS = {}
# Server settings the chart derives itself (not accepted under `settings:`),
# each with where its value comes from. Every other Settings field must be in
# values.schema.json: test_every_server_setting_is_settable_or_chart_managed.
CHART_MANAGED_SETTINGS = {
    "model": "model.source / model.dirName",
    "host": "server.host",
    "grpc_port": "server.grpcPort",
    "threads": "server.threads or resources.limits.cpu",
    "drain_timeout": "drain.timeoutSeconds (sized with the termination grace period)",
    "metrics_port": "metrics.enabled / metrics.port",
    "http": "http.enabled",
    "http_port": "http.port",
    "replica_name": "the pod name (downward API)",
    "api_keys": "apiKeys.* (a Secret)",
    "api_keys_file": "apiKeys.* (the chart passes QWEN_API_KEYS from a Secret instead)",
    "tls_cert_file": "TLS is the Ingress's / Gateway's / mesh's job; mount files with extraVolumes + extraEnv",
    "tls_key_file": "as tls_cert_file",
    "tls_client_ca_file": "as tls_cert_file",
    "port_file": "not for pods: their ports are fixed (it serves tests and scripts that bind port 0)",
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
            assert not _hardened(container, pod_security), (
                f"{where}/{container['name']}: {_hardened(container, pod_security)}"
            )
            assert "resources" in container and container["resources"].get("limits", {}).get("memory"), container[
                "name"
            ]
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
    grace = float(
        _config(docs).get("QWEN_MAX_CONNECTION_AGE_GRACE", Settings.model_fields["max_connection_age_grace"].default)
    )
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
    container = test_pod["spec"]["containers"][0]
    assert container["command"][:2] == ["python", "-c"]
    assert container["command"][2] == (CHART / "files" / "helm-test.py").read_text()
    env = {e["name"]: e for e in container["env"]}
    assert env["TARGET"]["value"] == f"{RELEASE}:{values['service']['port']}"
    # With keys on, the check reads them from the very Secret the server does.
    server_env = {e["name"]: e for e in server_container(docs)["env"]}
    if values["apiKeys"]["enabled"]:
        assert env["QWEN_API_KEYS"]["valueFrom"] == server_env["QWEN_API_KEYS"]["valueFrom"]
    else:
        assert "QWEN_API_KEYS" not in env and "QWEN_API_KEYS" not in server_env
    # `helm test --logs` reads the pod after the run: it must outlive success.
    assert "hook-succeeded" not in test_pod["metadata"]["annotations"].get("helm.sh/hook-delete-policy", "")
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
    assert not keys & CHART_MANAGED_SETTINGS.keys(), "settings the chart derives itself must not be settable twice"


def test_every_server_setting_is_settable_or_chart_managed():
    """A new server setting must reach values.schema.json (or be declared
    chart-managed above); five once went missing (rate limit, request size,
    public health/reflection) and helm refused them."""
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    keys = set(schema["properties"]["settings"]["properties"])
    missing = set(Settings.model_fields) - keys - CHART_MANAGED_SETTINGS.keys()
    assert not missing, f"add to values.schema.json settings (or CHART_MANAGED_SETTINGS): {sorted(missing)}"
    assert CHART_MANAGED_SETTINGS.keys() <= set(Settings.model_fields), "stale CHART_MANAGED_SETTINGS entry"


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
    """Rounded down: a thread beyond the CFS quota is throttled every step."""
    _, docs, values = case
    cpu = str(values["resources"]["limits"]["cpu"])
    expected = max(1, math.floor(int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)))
    assert _config(docs)["QWEN_THREADS"] == str(expected)


@pytest.mark.parametrize(
    ("limit", "threads"), [("3500m", "3"), ("1500m", "1"), ("500m", "1"), ("2", "2"), ("2.5", "2")]
)
def test_fractional_cpu_limits_round_threads_down(limit, threads):
    assert _config(render(sets={"resources.limits.cpu": limit}))["QWEN_THREADS"] == threads


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
        # The server's own default is 9090: the chart must turn it off, not omit it.
        assert not metric_ports and _config(docs)["QWEN_METRICS_PORT"] == "0"
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
    if not (values["autoscaling"]["enabled"] or values["keda"]["enabled"]):
        assert deployment["spec"]["replicas"] == values["replicaCount"]
        assert not by_kind(docs, "HorizontalPodAutoscaler")
        return
    assert "replicas" not in deployment["spec"]
    if values["keda"]["enabled"]:
        return  # test_keda_scales_on_slot_use
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


def _notes(tmp_path: pathlib.Path, *args: str) -> str:
    """`helm install --dry-run` needs a cluster; rendering NOTES.txt as an
    ordinary template of a chart copy gives the same text offline."""
    import shutil

    from chart_render import IMAGE_VALUES, helm

    chart = tmp_path / "qwen-grpc"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes-copy.txt")
    (chart / "templates" / "notes-rendered.yaml").write_text(
        'notes: |\n{{ tpl (.Files.Get "notes-copy.txt") . | indent 2 }}\n'
    )
    rendered = helm(
        "template",
        RELEASE,
        str(chart),
        "--namespace",
        "demo",
        "--values",
        str(IMAGE_VALUES),
        *args,
        "--show-only",
        "templates/notes-rendered.yaml",
    ).stdout
    return yaml.safe_load(rendered)["notes"]


def test_notes_give_the_port_forward_and_grpcurl_commands(tmp_path):
    notes = _notes(tmp_path)
    assert f"kubectl --namespace demo port-forward service/{RELEASE} 50051:50051" in notes
    assert (
        'grpcurl -plaintext -d \'{"service":"qwen.QwenService"}\' localhost:50051 grpc.health.v1.Health/Check' in notes
    )
    assert "grpcurl -plaintext -d '{}' localhost:50051 qwen.QwenService/ListModels" in notes
    assert "qwen.QwenService/ChatStream" in notes
    assert f"dns:///{RELEASE}-headless.demo.svc.cluster.local:50051" in notes
    assert "authorization" not in notes


def test_notes_send_the_api_key_when_keys_are_on(tmp_path):
    notes = _notes(tmp_path, "--set", "apiKeys.enabled=true", "--set", "apiKeys.keys[0]=" + "k" * 20)
    secret = f"{RELEASE}-api-keys"
    assert f"get secret {secret} -o jsonpath='{{.data.api-keys}}' | base64 -d | cut -d, -f1)" in notes
    header = '-H "authorization: Bearer $QWEN_API_KEY"'
    assert f"grpcurl -plaintext {header} -d '{{}}' localhost:50051 qwen.QwenService/ListModels" in notes
    assert f'grpcurl -plaintext {header} -d \'{{"messages"' in notes
    # Health stays public (settings.auth_public_health): probes send no key.
    assert (
        'grpcurl -plaintext -d \'{"service":"qwen.QwenService"}\' localhost:50051 grpc.health.v1.Health/Check' in notes
    )


def test_chart_and_package_versions_agree():
    import tomllib

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((pathlib.Path(CHART).parents[2] / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]


def test_readiness_tolerates_a_slow_probe(case):
    """One slow probe while two cores run a full batch must not drop a replica."""
    _, docs, _ = case
    assert server_container(docs)["readinessProbe"]["failureThreshold"] >= 3


def test_liveness_probes_the_engine_watchdog(case):
    from service.api.grpc_server import LIVENESS_SERVICE_NAME

    _, docs, _ = case
    container = server_container(docs)
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE_NAME
    assert container["startupProbe"]["grpc"]["service"] == ""


def test_default_termination_grace_fits_cluster_autoscaler():
    """cluster-autoscaler caps a scale-down's grace at 600 s by default
    (--max-graceful-termination-sec): a longer grace would be cut there."""
    spec = _pod_spec(render())
    assert spec["terminationGracePeriodSeconds"] <= 600


def test_pdb_lets_unhealthy_pods_be_evicted(case):
    _, docs, values = case
    if values["podDisruptionBudget"]["enabled"]:
        assert one(docs, "PodDisruptionBudget")["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def _gibibytes(quantity: str) -> float:
    units = {"Gi": 1.0, "Mi": 1 / 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_memory_request_covers_the_measured_working_set():
    """Measured (values.yaml): 1.1 GiB at idle + up to 1.6 GiB of KV cache."""
    resources = server_container(render())["resources"]
    assert _gibibytes(resources["requests"]["memory"]) >= 1.1 + 1.6
    assert _gibibytes(resources["limits"]["memory"]) >= _gibibytes(resources["requests"]["memory"])


def test_fetch_mode_requests_the_disk_of_its_model_volume(case):
    _, docs, values = case
    requests = server_container(docs)["resources"].get("requests", {})
    if values["model"]["source"] == "fetch":
        assert requests["ephemeral-storage"] == values["model"]["fetch"]["sizeLimit"]
    else:
        assert "ephemeral-storage" not in requests


def test_keda_scales_on_slot_use():
    docs = render(CHART / "ci" / "keda-values.yaml", sets={"fullnameOverride": "coder"}, namespace="llm")
    assert not by_kind(docs, "HorizontalPodAutoscaler"), "KEDA owns the HPA"
    scaled = one(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "coder"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    query = trigger["metadata"]["query"]
    selector = 'namespace="llm",job="coder"'
    assert query == f"sum(qwen_requests_running{{{selector}}}) + sum(qwen_requests_waiting{{{selector}}})"
    assert trigger["metadata"]["threshold"] == "10"
    assert trigger["authenticationRef"] == {"name": "prometheus-auth"}
    assert scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]


def test_hpa_scales_on_waiting_requests_not_cpu_by_default():
    docs = render(sets={"autoscaling.enabled": "true", "metrics.enabled": "true"})
    metrics = one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Pods"]
    assert metrics[0]["pods"]["metric"]["name"] == "qwen_requests_waiting"


def test_ways_in_from_outside_reach_the_grpc_port():
    docs = render(CHART / "ci" / "all-features-values.yaml")
    regular = one(docs, "Service", RELEASE)
    (grpc,) = [p for p in regular["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc["appProtocol"] == "grpc"
    ingress = one(docs, "Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    # Longer than the longest stream the server lets run, or the proxy cuts it.
    assert int(ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 585
    backends = [path["backend"]["service"] for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]]
    assert backends == [{"name": RELEASE, "port": {"name": "grpc"}}]
    route = one(docs, "GRPCRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == [{"name": "public", "namespace": "gateways", "sectionName": "https"}]
    assert route["spec"]["rules"] == [{"backendRefs": [{"name": RELEASE, "port": grpc["port"]}]}]


@pytest.mark.parametrize("enabled", [False, True])
def test_http_toggle_opens_the_port_everywhere_or_nowhere(enabled):
    docs = render(sets={"http.enabled": str(enabled).lower(), "http.port": "8080"})
    config = _config(docs)
    assert config["QWEN_HTTP"] == str(enabled).lower()
    container_ports = {p["name"]: p["containerPort"] for p in server_container(docs)["ports"]}
    service_ports = {p["name"]: p for p in one(docs, "Service", RELEASE)["spec"]["ports"]}
    policy_ports = {port["port"] for rule in one(docs, "NetworkPolicy")["spec"]["ingress"] for port in rule["ports"]}
    headless_ports = {p["name"] for p in one(docs, "Service", f"{RELEASE}-headless")["spec"]["ports"]}
    if enabled:
        assert config["QWEN_HTTP_PORT"] == "8080" and container_ports["http"] == 8080
        assert service_ports["http"]["targetPort"] == "http" and service_ports["http"]["port"] == 8080
        assert "http" in policy_ports
    else:
        assert "QWEN_HTTP_PORT" not in config and "http" not in container_ports
        assert "http" not in service_ports and "http" not in policy_ports
    assert headless_ports == {"grpc"}


def test_service_monitor_scrape_options():
    docs = render(CHART / "ci" / "monitoring-values.yaml", namespace="llm")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["llm"]}
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["honorLabels"] is True and endpoint["scheme"] == "http"
    tls = one(render(CHART / "ci" / "all-features-values.yaml"), "ServiceMonitor")["spec"]["endpoints"][0]
    assert tls["scheme"] == "https" and tls["tlsConfig"]["serverName"] == "qwen-grpc-metrics"
    plain = one(render(sets={"metrics.enabled": "true", "metrics.serviceMonitor.enabled": "true"}), "ServiceMonitor")
    assert "namespace" not in plain["metadata"] and "namespaceSelector" not in plain["spec"]
    assert not {"honorLabels", "scheme", "tlsConfig"} & plain["spec"]["endpoints"][0].keys()
