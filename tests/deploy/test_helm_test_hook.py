"""The `helm test` pod's check, exactly as the chart renders it (command and
environment, the API keys from the chart's own Secret), run against a real
server. Before, the hook's grpcurl sent no key and failed whenever
apiKeys.enabled."""

from __future__ import annotations

import base64
import subprocess

import pytest
from chart_render import REPO_ROOT, by_kind, one, render
from harness import running_server

KEY = "hook-test-key-0123456789"


def _hook_pod(api_keys: bool) -> tuple[list[str], dict[str, str]]:
    sets = (
        {"apiKeys.enabled": "true", "apiKeys.keys[0]": KEY, "apiKeys.keys[1]": "second-key-0123456789"}
        if api_keys
        else {}
    )
    docs = render(sets=sets)
    (pod,) = by_kind(docs, "Pod")
    (container,) = pod["spec"]["containers"]
    env = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:  # secretKeyRef: read it from the Secret the chart renders
            ref = item["valueFrom"]["secretKeyRef"]
            secret = one(docs, "Secret", ref["name"])
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return container["command"], env


def _run_hook(command: list[str], env: dict[str, str], target: str) -> subprocess.CompletedProcess:
    import os
    import sys

    assert command[0] == "python"
    run_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env, "TARGET": target}
    return subprocess.run([sys.executable, *command[1:]], env=run_env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir):
    with running_server(
        tiny_model_dir, "--threads", "1", env={"QWEN_API_KEYS": f"{KEY},other-key-0123456789"}
    ) as server:
        yield server


def test_hook_passes_against_a_server_with_api_keys(keyed_server):
    command, env = _hook_pod(api_keys=True)
    assert env["QWEN_API_KEYS"].startswith(KEY + ",")
    result = _run_hook(command, env, keyed_server.target)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SERVING" in result.stdout and "finish=" in result.stdout


def test_hook_without_the_key_is_refused(keyed_server):
    """Two-sided: the same check with no key (keys off in the chart) fails
    against a server that requires one."""
    command, env = _hook_pod(api_keys=False)
    assert "QWEN_API_KEYS" not in env
    result = _run_hook(command, env, keyed_server.target)
    assert result.returncode != 0 and "UNAUTHENTICATED" in result.stderr, result.stdout + result.stderr


def test_hook_passes_against_a_server_without_keys(tiny_model_dir):
    command, env = _hook_pod(api_keys=False)
    with running_server(tiny_model_dir, "--threads", "1") as server:
        result = _run_hook(command, env, server.target)
    assert result.returncode == 0, result.stdout + result.stderr
