"""`make docker-test` as a test: build the image with an isolated dockerd and
prove it serves the real model from a read-only, non-root container (see
deploy/docker/docker_test.py for every step and check)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from chart_render import REPO_ROOT

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="starts its own dockerd: needs root (CI runs as root)"),
]


@pytest.mark.timeout(1800)
def test_image_builds_and_serves_read_only_as_non_root(real_model_dir):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "deploy/docker/docker_test.py"), "--model-dir", str(real_model_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1750,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    report = result.stdout[-8000:] + "\n" + result.stderr[-8000:]
    assert result.returncode == 0, report
    for check in (
        "health SERVING",
        "Chat answered",
        "uid 10001; root filesystem read-only",
        "helm test hook script passes",
        "exited 0",
        "passed",
    ):
        assert check in result.stdout, f"{check!r} missing:\n{report}"
    assert "could not remove" not in result.stdout, report
    print(f"docker-test took {time.monotonic() - started:.0f} s\n{result.stdout[-3000:]}")
