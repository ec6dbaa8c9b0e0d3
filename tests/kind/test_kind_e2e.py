"""End to end on a kind cluster, as a user deploys it: build the image, load
it into kind, `helm upgrade --install --wait`, port-forward + grpcurl
(health, list, chat), scale to 3 and check round_robin spread from an
in-cluster client, `helm test --logs`, delete a pod during streams with zero
failed calls, uninstall.

Needs docker, kind, and network access for the image build (the model is
baked in with MODEL_FETCH=true; `make docker-wheels` fetches CPU torch on
x86_64; set QWEN_KIND_IMAGE to use an image you built already). The image
goes in with `docker save` + `kind load image-archive`, which works with
Docker's containerd image store too (`kind load docker-image` does not).
The cluster's Kubernetes version is checked against the chart's kubeVersion
first. `make kind-test` runs it; without kind it is skipped with the reason.
On a failure the pods, their logs and the namespace's events are printed.
The spread and no-failure assertions are tests/lb_assertions.py, the same
ones the multi-replica test uses.

Environment knobs: QWEN_KIND_CLUSTER (default qwen-grpc-e2e; an existing
cluster of that name is reused and kept, and a release or client Jobs left
in it by an aborted run are replaced), QWEN_KIND_NODE_IMAGE (kindest/node
image for a new cluster), QWEN_KIND_IMAGE, QWEN_KIND_KEEP=1 (keep the
cluster afterwards).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "deploy"))
from chart_render import CHART, REPO_ROOT, tool  # noqa: E402
from lb_assertions import assert_no_failures, assert_spread  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from kind_manifests import client_job  # noqa: E402

MISSING = [name for name in ("kind", "docker") if shutil.which(name) is None]
pytestmark = [
    pytest.mark.kind,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"kind end-to-end test skipped: {' and '.join(MISSING)} not on PATH (it needs Docker and kind)",
    ),
]

CLUSTER = os.environ.get("QWEN_KIND_CLUSTER", "qwen-grpc-e2e")
RELEASE = "qwen-grpc"
NAMESPACE = "qwen-e2e"
IMAGE = os.environ.get("QWEN_KIND_IMAGE", "qwen-grpc:kind-e2e")
HEADLESS_TARGET = f"dns:///{RELEASE}-headless.{NAMESPACE}.svc.cluster.local:50051"
VALUES = pathlib.Path(__file__).with_name("values-kind.yaml")
CLIENT_SCRIPT = pathlib.Path(__file__).with_name("in_cluster_client.py")
# Label on the client Jobs and their ConfigMaps (see kind_manifests.client_job).
CLIENT_LABEL = "qwen-grpc-e2e/client=true"


def sh(*argv: str, check: bool = True, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def kubectl(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return sh(tool("kubectl"), "--context", f"kind-{CLUSTER}", "--namespace", NAMESPACE, *args, **kwargs)


def helm(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return sh(tool("helm"), "--kube-context", f"kind-{CLUSTER}", "--namespace", NAMESPACE, *args, **kwargs)


def _version(text: str) -> tuple[int, int]:
    major, minor = re.match(r"v?(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


def chart_minimum_kubernetes() -> tuple[int, int]:
    """The floor of Chart.yaml's kubeVersion (">=1.29.0-0")."""
    constraint = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    return _version(constraint.removeprefix(">="))


def check_cluster_version() -> str:
    server = json.loads(sh(tool("kubectl"), "--context", f"kind-{CLUSTER}", "version", "-o", "json").stdout)
    version = server["serverVersion"]["gitVersion"]
    minimum = chart_minimum_kubernetes()
    assert _version(version) >= minimum, (
        f"kind cluster {CLUSTER} runs Kubernetes {version}; the chart needs >= {minimum[0]}.{minimum[1]}: "
        f"delete it or create it with QWEN_KIND_NODE_IMAGE=kindest/node:<newer>"
    )
    return version


def load_image(image: str) -> None:
    """docker save + kind load image-archive: `kind load docker-image` fails
    when Docker uses the containerd image store (Docker Desktop's default)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = pathlib.Path(tmp) / "image.tar"
        sh("docker", "save", "--output", str(archive), image, timeout=1800)
        sh("kind", "load", "image-archive", str(archive), "--name", CLUSTER, timeout=1800)


@pytest.fixture(scope="module")
def cluster():
    existing = CLUSTER in sh("kind", "get", "clusters").stdout.split()
    if not existing:
        node_image = os.environ.get("QWEN_KIND_NODE_IMAGE")
        sh(
            "kind",
            "create",
            "cluster",
            "--name",
            CLUSTER,
            "--wait",
            "180s",
            *(("--image", node_image) if node_image else ()),
        )
    try:
        check_cluster_version()
        if "QWEN_KIND_IMAGE" not in os.environ:
            sh("make", "docker-wheels", cwd=REPO_ROOT, timeout=1800)
            sh("docker", "build", "--build-arg", "MODEL_FETCH=true", "-t", IMAGE, str(REPO_ROOT), timeout=3600)
        load_image(IMAGE)
        sh(tool("kubectl"), "--context", f"kind-{CLUSTER}", "create", "namespace", NAMESPACE, check=False)
        # A reused cluster may hold what an aborted run left: client Jobs and their scripts.
        kubectl("delete", "jobs,configmaps", "-l", CLIENT_LABEL, "--ignore-not-found", "--wait=true", check=False)
        yield CLUSTER
    finally:
        if not existing and os.environ.get("QWEN_KIND_KEEP") != "1":
            sh("kind", "delete", "cluster", "--name", CLUSTER, check=False)


@pytest.fixture(scope="module")
def release(cluster):
    repository, tag = IMAGE.rsplit(":", 1)
    # upgrade --install: a release left by an aborted run on a reused cluster
    # is brought back to these values (replicas included) instead of failing.
    helm(
        "upgrade",
        "--install",
        RELEASE,
        str(CHART),
        "--values",
        str(VALUES),
        "--set",
        f"image.repository={repository}",
        "--set",
        f"image.tag={tag}",
        "--wait",
        "--timeout",
        "15m",
        timeout=1000,
    )
    try:
        yield RELEASE
    finally:
        helm("uninstall", RELEASE, "--wait", check=False)
        kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


@pytest.fixture(autouse=True)
def diagnostics_on_failure(request):
    """On a failed test, print what a person would look at first."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.failed or MISSING:
        return
    for args in (
        ("get", "pods", "-o", "wide"),
        ("get", "events", "--sort-by=.lastTimestamp"),
        ("describe", "pods", "-l", f"app.kubernetes.io/instance={RELEASE}"),
        ("logs", "-l", f"app.kubernetes.io/instance={RELEASE}", "--all-containers", "--prefix", "--tail=200"),
    ):
        result = kubectl(*args, check=False, timeout=60)
        print(f"\n$ kubectl -n {NAMESPACE} {' '.join(args)}\n{result.stdout}{result.stderr}")


@contextlib.contextmanager
def port_forward(service: str, remote: int):
    """kubectl port-forward on a port it picks (":remote"); yields once it
    reports forwarding and a health check through it answers."""
    process = subprocess.Popen(
        [
            tool("kubectl"),
            "--context",
            f"kind-{CLUSTER}",
            "--namespace",
            NAMESPACE,
            "port-forward",
            f"service/{service}",
            f":{remote}",
            "--address",
            "127.0.0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        output = []
        while True:
            try:
                line = lines.get(timeout=30)
            except queue.Empty:
                raise AssertionError(f"port-forward did not start: {''.join(output)}") from None
            output.append(line)
            match = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) ->", line)
            if match:
                break
            assert process.poll() is None, f"port-forward exited: {''.join(output)}"
        target = f"127.0.0.1:{match.group(1)}"
        health = grpcurl("-d", '{"service":"qwen.QwenService"}', target, "grpc.health.v1.Health/Check")
        assert health["status"] == "SERVING", f"no health answer through the port-forward: {health}"
        yield target
    finally:
        process.terminate()
        process.wait(10)


def grpcurl(*args: str) -> dict:
    result = sh(tool("grpcurl"), "-plaintext", "-max-time", "120", *args, timeout=150)
    return json.loads(result.stdout)


def run_client_job(name: str, *client_args: str, on_started=None, timeout: float = 600) -> dict:
    """Run in_cluster_client.py in a Job with the server image; returns its RESULT."""
    kubectl("create", "configmap", f"{name}-script", f"--from-file=client.py={CLIENT_SCRIPT}")
    kubectl("label", "configmap", f"{name}-script", CLIENT_LABEL)
    job = client_job(name, IMAGE, list(client_args))
    kubectl("apply", "-f", "-", input=json.dumps(job))
    try:
        if on_started is not None:
            deadline = time.monotonic() + 120
            while "STARTED" not in kubectl("logs", f"job/{name}", check=False).stdout:
                assert time.monotonic() < deadline, "client job did not start"
                time.sleep(1)
            on_started()
        kubectl("wait", f"job/{name}", "--for=condition=complete", f"--timeout={int(timeout)}s", timeout=timeout + 30)
        logs = kubectl("logs", f"job/{name}").stdout
        (line,) = [out for out in logs.splitlines() if out.startswith("RESULT ")]
        return json.loads(line.removeprefix("RESULT "))
    finally:
        kubectl("delete", "job", name, "--wait=false", check=False)
        kubectl("delete", "configmap", f"{name}-script", check=False)


def ready_pods() -> list[str]:
    pods = json.loads(
        kubectl(
            "get", "pods", "-l", f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/name=qwen-grpc", "-o", "json"
        ).stdout
    )["items"]
    return sorted(
        p["metadata"]["name"]
        for p in pods
        if p["metadata"].get("deletionTimestamp") is None
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    )


def test_port_forward_health_list_and_chat(release):
    with port_forward(RELEASE, 50051) as target:
        health = grpcurl("-d", '{"service":"qwen.QwenService"}', target, "grpc.health.v1.Health/Check")
        assert health["status"] == "SERVING"
        models = grpcurl("-d", "{}", target, "qwen.QwenService/ListModels")
        assert models["models"]
        chat = grpcurl(
            "-d",
            json.dumps({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16, "temperature": 0}),
            target,
            "qwen.QwenService/Chat",
        )
        assert chat["is_final"] is True and chat["content"].strip()


def test_scale_to_three_and_calls_spread_over_all(release):
    kubectl("scale", f"deployment/{RELEASE}", "--replicas=3")
    kubectl("rollout", "status", f"deployment/{RELEASE}", "--timeout=600s", timeout=660)
    pods = ready_pods()
    assert len(pods) == 3, pods
    # A fresh client resolves the headless name once it starts: all three are in DNS.
    result = run_client_job("qwen-spread", "spread", HEADLESS_TARGET, "60")
    assert_spread(result["replicas"], pods)


def test_helm_test_hook_passes(release):
    # --logs reads the test pod after it ran: the chart keeps it (no
    # hook-succeeded delete policy), else Helm 3.17 fails with "pod not found".
    result = helm("test", RELEASE, "--logs", "--timeout", "5m", timeout=330)
    assert re.search(r"Phase:\s+Succeeded", result.stdout), result.stdout
    assert "health of qwen.QwenService" in result.stdout and "SERVING" in result.stdout, result.stdout


def test_deleting_a_pod_during_streams_fails_no_call(release):
    victim = ready_pods()[0]

    def delete_victim() -> None:
        # Graceful delete: preStop sleep, SIGTERM, drain. Not --wait: calls go on meanwhile.
        kubectl("delete", "pod", victim, "--wait=false")

    result = run_client_job("qwen-drain", "streams", HEADLESS_TARGET, "6", "40", on_started=delete_victim)
    assert_no_failures(result["outcomes"])
    assert sum(1 for what, _ in result["outcomes"] if what.startswith("stream-")) == 6
