"""The client distribution (clients/python, `qwen-grpc-client`): it installs
on its own into a fresh virtual environment with grpcio and protobuf only,
and talks to a real server from there."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from harness import REPO_ROOT, running_server

from qwen_grpc_client import QwenClient
from qwen_grpc_client.pb.qwen import qwen_service_pb2, qwen_service_pb2_grpc

CLIENT_DIR = REPO_ROOT / "clients" / "python"
PROMPT = "Hello there"


def _pip(venv, *args: str) -> subprocess.CompletedProcess:
    """This venv's pip acting on `venv`; without PYTHONPATH, which would show
    pip the source trees on it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    argv = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "--disable-pip-version-check", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)


def _minimum(requirement: str) -> str:
    return re.search(r">=([0-9.]+)", requirement).group(1)


def test_dependencies_are_grpcio_and_protobuf_at_the_stub_versions():
    """The committed stubs refuse older runtimes at import (grpcio) or are
    not supported by them (protobuf gencode): the declared lower bounds must
    be the generator's versions, so a regeneration with newer tools shows up
    here instead of on a user's machine."""
    project = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]
    requirements = {re.split(r"[<>=]", r, maxsplit=1)[0]: r for r in project["dependencies"]}
    assert sorted(requirements) == ["grpcio", "protobuf"]
    assert _minimum(requirements["grpcio"]) == qwen_service_pb2_grpc.GRPC_GENERATED_VERSION
    gencode = re.search(r"^# Protobuf Python Version: ([0-9.]+)$", open(qwen_service_pb2.__file__).read(), re.M).group(
        1
    )
    assert _minimum(requirements["protobuf"]) == gencode
    assert project["optional-dependencies"]["otel"] == ["opentelemetry-api>=1.30"]


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory):
    """A fresh venv with only `pip install ./clients/python` in it (from a
    copy: pip builds a local project in place). grpcio/protobuf are pinned to
    the lock's versions so pip's cache usually serves them."""
    folder = tmp_path_factory.mktemp("client-venv")
    source = folder / "src"
    shutil.copytree(CLIENT_DIR, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    result = _pip(venv, "install", "--quiet", "-c", str(REPO_ROOT / "requirements.lock"), str(source))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return venv


def _run_in(venv, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    # No PYTHONPATH and a neutral working directory: only the venv's packages count.
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(venv.parent)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=venv.parent)


def test_fresh_venv_holds_the_client_and_nothing_of_the_server(client_venv):
    packages = _pip(client_venv, "list", "--format=freeze").stdout
    names = {line.split("==")[0].lower().replace("_", "-") for line in packages.split()}
    assert names == {"qwen-grpc-client", "grpcio", "protobuf", "typing-extensions"}, names  # grpcio needs the last
    script = (
        "import importlib.util as u\n"
        "for name in ('torch', 'transformers', 'service', 'opentelemetry', 'qwen_grpc_client'):\n"
        "    print(name, u.find_spec(name) is not None)\n"
    )
    result = _run_in(client_venv, str(client_venv / "bin" / "python"), "-c", script)
    assert result.stdout.split("\n")[:5] == [
        "torch False",
        "transformers False",
        "service False",
        "opentelemetry False",
        "qwen_grpc_client True",
    ], result.stdout + result.stderr


def test_fresh_venv_chats_with_a_real_server(client_venv, tiny_model_dir):
    with running_server(tiny_model_dir, "--threads", "1", "--replica-name", "venv-test") as server:
        with QwenClient(server.target, timeout=30) as client:
            expected = client.chat([{"role": "user", "content": PROMPT}], temperature=0, max_tokens=12).content
        chat = _run_in(
            client_venv,
            str(client_venv / "bin" / "qwen-chat"),
            "--target",
            server.target,
            "--temperature",
            "0",
            "--max-tokens",
            "12",
            "--usage",
            PROMPT,
        )
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout == expected + "\n"
        assert "completion=12" in chat.stderr and "replica=venv-test]" in chat.stderr
        refused = _run_in(
            client_venv, str(client_venv / "bin" / "qwen-chat"), "--target", server.target, "--session-id", "", PROMPT
        )
        assert refused.returncode == 2 and "--session-id: session_id must be a non-empty" in refused.stderr
        sdk = (
            "import sys\n"
            "from qwen_grpc_client import QwenClient\n"
            "with QwenClient(sys.argv[1], timeout=30) as client:\n"
            "    for session in (None, 'conversation-1'):\n"
            "        result = client.chat([('user', sys.argv[2])], temperature=0, max_tokens=12, session_id=session)\n"
            "        print(repr(result.content), result.replica, result.completion_tokens)\n"
        )
        result = _run_in(client_venv, str(client_venv / "bin" / "python"), "-c", sdk, server.target, PROMPT)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [f"{expected!r} venv-test 12"] * 2
