"""Render the Helm chart and the kustomize manifests for the deploy tests,
with the helm and kubectl that `make tools` installs next to the venv's python."""

from __future__ import annotations

import functools
import os
import pathlib
import shutil
import subprocess
import sys

import yaml

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "deploy" / "helm" / "qwen-grpc"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
# Kubernetes versions every rendering is validated against (the chart's
# kubeVersion floor up to the newest the schemas package ships that we claim).
KUBE_VERSIONS = ("1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0")
RELEASE = "qwen-grpc"
# The one value the chart requires (no public image exists): every render
# here starts from it; ci files and `sets` override it.
IMAGE_VALUES = pathlib.Path(__file__).with_name("image-values.yaml")


@functools.cache
def tool(name: str) -> str:
    """The binary from `make tools` (beside sys.executable), else PATH."""
    beside = pathlib.Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: run `make tools`")
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([tool("helm"), *args], capture_output=True, text=True, check=check)


def template_text(
    *values_files: pathlib.Path | str,
    sets: dict[str, str] | None = None,
    namespace: str = "default",
    kube_version: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    args = ["template", RELEASE, str(CHART), "--namespace", namespace]
    for path in (IMAGE_VALUES, *values_files):
        args += ["--values", str(path)]
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    if kube_version:
        args += ["--kube-version", kube_version]
    return helm(*args, check=check)


def render(
    *values_files: pathlib.Path | str, sets: dict[str, str] | None = None, namespace: str = "default"
) -> list[dict]:
    """Every object the chart renders (hooks included), as dicts."""
    text = template_text(*values_files, sets=sets, namespace=namespace).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in matches]}"
    return matches[0]


def server_container(docs: list[dict]) -> dict:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "server"]
    return container


def kustomize(path: pathlib.Path) -> list[dict]:
    result = subprocess.run([tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
